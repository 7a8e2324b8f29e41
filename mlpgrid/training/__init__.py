"""Training one trial or a group of them in one process: the loop, its steps, checkpoints, stages."""
