from mlpgrid.cli import main

main()
