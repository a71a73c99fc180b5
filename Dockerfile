# One image for every Airflow component, the Celery workers (CPU and GPU) and the MLflow server:
# the project's pinned lock plus the code. Built by docker-compose.yaml.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MALLOC_ARENA_MAX=2 \
    AIRFLOW_HOME=/opt/airflow \
    PYTHONPATH=/opt/airflow

RUN apt-get update \
    && apt-get install -y --no-install-recommends curl libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 50000 --gid 0 airflow

COPY requirements.txt /tmp/
RUN pip install -r /tmp/requirements.txt

WORKDIR /opt/airflow
COPY --chown=airflow:0 ml ./ml
COPY --chown=airflow:0 dags ./dags
COPY --chown=airflow:0 plugins ./plugins
COPY --chown=airflow:0 deploy ./deploy
RUN mkdir -p /opt/airflow/logs /opt/airflow/secrets /var/lib/mlflow-auth \
    && chown -R airflow:0 /opt/airflow /var/lib/mlflow-auth
USER airflow
