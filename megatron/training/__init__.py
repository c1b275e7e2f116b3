"""Training: the loop, its optimizer, learning-rate schedule and runtime controls."""
