# One Dockerfile, four images (build targets), so that only what trains carries CUDA:
#
#   airflow     scheduler, API server, DAG processor, triggerer, init: Airflow, no torch
#   mlflow      the MLflow tracking server (basic-auth app): no torch
#   worker      Celery worker on the default queue (ingest, downloads, split, register,
#               batch inference): CPU-only torch
#   worker-gpu  Celery worker on the gpu queue (training): torch with CUDA 13 (NVIDIA driver
#               580 or newer, a GPU of compute capability 7.5 or newer)
#
# What each target installs is declared once, as dependency groups in pyproject.toml, and locked
# with hashes by scripts/lock: requirements.txt (the GPU worker's runtime) and deploy/locks/*.txt
# (the other images); pip checks every file against its hash. Built by docker-compose.yaml;
# ML_CODE_VERSION (the git commit) is baked in at build time.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MALLOC_ARENA_MAX=2 \
    AIRFLOW_HOME=/opt/airflow \
    PYTHONPATH=/opt/airflow
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 50000 --gid 0 airflow \
    # Every folder a volume mounts exists here, owned by airflow: a named volume copies the
    # owner on first use, so the services can write to it (a missing one would be root's).
    && mkdir -p /opt/airflow/logs /opt/airflow/secrets /home/airflow/.cache/torch \
        /var/lib/mlflow-auth \
    && chown -R airflow:0 /opt/airflow /home/airflow /var/lib/mlflow-auth
COPY requirements.txt deploy/locks /tmp/build/
WORKDIR /opt/airflow
ARG ML_CODE_VERSION=unknown
ENV ML_CODE_VERSION=${ML_CODE_VERSION}

FROM base AS airflow
RUN pip install --require-hashes -r /tmp/build/airflow.txt
COPY --chown=airflow:0 dags ./dags
COPY --chown=airflow:0 plugins ./plugins
COPY --chown=airflow:0 deploy ./deploy
COPY --chown=airflow:0 ml ./ml
USER airflow

FROM base AS mlflow
RUN pip install --require-hashes -r /tmp/build/mlflow.txt
COPY --chown=airflow:0 deploy ./deploy
USER airflow

FROM airflow AS worker
USER root
# The CPU-only build of the pinned torch: the default-queue worker scores images but never
# trains on a GPU, so it does without the CUDA libraries (about 5 GB). PyTorch's own index
# serves it (pinned by version; the only install here without a hash in the lock).
RUN pip install --index-url https://download.pytorch.org/whl/cpu \
        "torch==2.14.1+cpu" "torchvision==0.29.1+cpu" \
    && pip install --require-hashes -r /tmp/build/worker.txt
USER airflow

FROM airflow AS worker-gpu
USER root
RUN pip install --require-hashes -r /tmp/build/requirements.txt
USER airflow
