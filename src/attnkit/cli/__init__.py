"""The ``attnkit`` command: one module per subcommand, registered in :mod:`attnkit.cli.registry`."""
