"""``python cli.py ...`` from a checkout: the same as the ``mlpgrid`` command."""

from mlpgrid.cli import main

if __name__ == "__main__":
    main()
