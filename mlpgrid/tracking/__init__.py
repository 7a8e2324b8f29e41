"""MLflow: writing a grid's runs (``writer``) and reading them back (``reader``)."""
