"""One module per ``bdprune`` command: ``add_arguments(parser)`` and ``run(args) -> int``."""
