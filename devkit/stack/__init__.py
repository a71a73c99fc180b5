"""The whole pipeline on this machine, no Docker: a local S3 endpoint (moto), an MLflow server
(SQLite registry, artifacts in S3), the image server standing in for Flickr (synthetic images)
and Airflow (SQLite, LocalExecutor: API server, scheduler, DAG processor, triggerer, as
`airflow standalone` would run them), each in its own process group. Every service listens on
127.0.0.1 only.

    scripts/stack demo [--sample N] [--epochs N]   # up, one DAG run, summary
    scripts/stack up | status | down
    scripts/stack serve [--port 5001]   # the champion over HTTP (python -m ml serve)
    scripts/stack up --topology celery   # docker-compose.yaml's topology, natively
    scripts/stack restart airflow-worker --kill   # a worker killed and started again
    scripts/stack stop redis; scripts/stack start redis   # one service

(``scripts/stack`` runs ``.venv/bin/python -m devkit.stack`` from the repository root.)
The package's rooms: ``local`` (the stack as an object: its services, start and stop),
``processes`` (``/proc``: who started whom, kill a whole tree), ``airflow_api`` (Airflow's REST
API), ``report`` (the progress line, the promotion in words) and ``demo_run`` (the demo).

``demo`` leaves the stack up for browsing; ``down`` stops every process it started (by process
group, then by a marker in their environment, so nothing is orphaned) and deletes its state
(the S3 endpoint keeps data in memory, so a stopped stack's data is gone anyway).
Ports: STACK_AIRFLOW_PORT (8080), STACK_MLFLOW_PORT (5000), STACK_S3_PORT (9000),
STACK_IMAGES_PORT (8000); state folder: STACK_DIR (.run/stack).
"""
