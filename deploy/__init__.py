"""What the deployment's containers run besides the services themselves: the configuration
check, the extra databases, the pipeline's MLflow user, and ``init_env``, which writes the .env
they read. Each runs as a module from the repository root (``python -m deploy.check_env``); the
images set ``PYTHONPATH=/opt/airflow`` and start there."""
