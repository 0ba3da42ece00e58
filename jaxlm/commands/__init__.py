"""Implementations of the ``jaxlm`` subcommands."""
