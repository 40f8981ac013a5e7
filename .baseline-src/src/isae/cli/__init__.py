"""One module per ``isae`` subcommand: ``add_parser(subparsers)`` and ``run(args) -> dict``."""
