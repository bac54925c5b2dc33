"""CLI subcommands, one module per feature area; see ``workbench.cli``."""
