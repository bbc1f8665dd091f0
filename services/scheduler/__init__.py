"""The scheduler service: `python -m services.scheduler`."""
