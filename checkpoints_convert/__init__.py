"""Checkpoint converters, run as ``python -m checkpoints_convert.<name>``."""
