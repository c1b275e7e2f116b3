"""Training metrics and timing: the metrics logger, named timers and model FLOPs utilization."""
