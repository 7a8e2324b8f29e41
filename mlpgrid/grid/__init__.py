"""What a grid file says: its schema and trials, the paths under storage, metric names, locks."""
