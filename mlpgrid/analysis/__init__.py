"""The frontier from finished trials: fits, the report, proposed grids, figures."""
