"""Celery: the app, configured from the settings, and the one task that runs a Job row."""
