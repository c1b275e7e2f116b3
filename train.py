import sys
sys.exit("the training loop is not built yet")
