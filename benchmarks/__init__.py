"""Benchmarks that print figures (never timed assertions): run each as a module from the
repository root, for example ``.venv/bin/python -m benchmarks.download``."""
