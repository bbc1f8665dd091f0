"""Offline tools run as `python -m engine_core.tools.<name>`."""
