"""Running a grid's trials: what is left to do, groups, placement on Ray, the live view."""
