"""The job queue (Celery): the app, configured from the settings (broker), and the one task
that runs a Job row with the worker's lifecycle (celery_app)."""
