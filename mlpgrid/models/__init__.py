"""The networks: their shapes as plain data (no torch in ``architecture``) and as torch modules."""
