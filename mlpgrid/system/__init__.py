"""What mlpgrid asks of the operating system and of other processes, below every other layer: file
locks between processes (:mod:`~mlpgrid.system.locks`) and bounded waits for servers
(:mod:`~mlpgrid.system.waits`)."""
