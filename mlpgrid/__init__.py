"""mlpgrid: compute grids of vision-MLP training runs and their compute-optimal frontier."""
