"""One module per `lambo` sub-command, each with ``add_arguments(parser)`` and ``run(args) -> int``."""
