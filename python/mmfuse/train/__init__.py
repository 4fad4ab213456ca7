"""Training: typed run config, optimiser and schedules, checkpoints that resume exactly, and the
loop behind `mmfuse train`."""
