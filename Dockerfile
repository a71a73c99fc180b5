# One Dockerfile, three images (build targets):
#
#   airflow     scheduler, API server, DAG processor, triggerer, init, store-init: Airflow and
#               the `ml` package without torch (no service of these trains or scores)
#   mlflow      the MLflow tracking server (basic-auth app) and the database set-up step
#   worker      the Celery workers, both queues: Airflow, `ml` and torch. PyPI's torch wheels
#               carry CUDA 13 (NVIDIA driver 580+, compute capability 7.5+) and run on the CPU
#               too, so the default-queue worker and the GPU worker share one image, every file
#               of it checked against the hash in requirements.txt
#
# What each target installs is declared once, as dependency groups in pyproject.toml, and
# locked with hashes by scripts/lock (requirements.txt for the workers, deploy/locks/*.txt for
# the others). Layers run from what changes least to what changes most: system packages, the
# pinned installer, the target's lock, the code, and last the code version, so that a code
# change rebuilds one small layer and never reinstalls torch.
#
#   ML_CODE_VERSION=$(git rev-parse --short HEAD) docker compose build
#
# PYTHON_IMAGE: any Debian bookworm image with Python 3.11 as `python` on PATH (scripts/
# compose-smoke builds one from Debian's packages where no registry can be reached).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NO_CACHE=1 \
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
# The installer, pinned and hash-checked like everything it installs.
COPY deploy/locks/installer.txt /tmp/build/installer.txt
RUN python -m pip install --require-hashes -r /tmp/build/installer.txt && rm -r /tmp/build
WORKDIR /opt/airflow

# The project's code, gathered in one stage so that each target copies it in one layer.
FROM scratch AS code
COPY dags /opt/airflow/dags
COPY plugins /opt/airflow/plugins
COPY ml /opt/airflow/ml
COPY deploy /opt/airflow/deploy

FROM base AS airflow
COPY deploy/locks/airflow.txt /tmp/build/airflow.txt
RUN uv pip install --python "$(command -v python)" --compile-bytecode --require-hashes -r /tmp/build/airflow.txt \
    && rm -r /tmp/build
COPY --from=code --chown=airflow:0 /opt/airflow /opt/airflow
USER airflow
RUN python -m compileall -q dags plugins ml deploy
ARG ML_CODE_VERSION=unknown
ENV ML_CODE_VERSION=${ML_CODE_VERSION}

FROM base AS mlflow
COPY deploy/locks/mlflow.txt /tmp/build/mlflow.txt
RUN uv pip install --python "$(command -v python)" --compile-bytecode --require-hashes -r /tmp/build/mlflow.txt \
    && rm -r /tmp/build
COPY --from=code --chown=airflow:0 /opt/airflow /opt/airflow
USER airflow
ARG ML_CODE_VERSION=unknown
ENV ML_CODE_VERSION=${ML_CODE_VERSION}

FROM base AS worker
COPY requirements.txt /tmp/build/requirements.txt
RUN uv pip install --python "$(command -v python)" --compile-bytecode --require-hashes -r /tmp/build/requirements.txt \
    && rm -r /tmp/build
COPY --from=code --chown=airflow:0 /opt/airflow /opt/airflow
USER airflow
# Compile once at build what every task would otherwise compile again: the code's bytecode
# (PYTHONDONTWRITEBYTECODE keeps processes from writing it) and the near-duplicate search's loop
# (numba's disk cache in ml/__pycache__).
RUN python -m compileall -q dags plugins ml deploy \
    && python -c "import numpy; from ml.dedup import near_pairs; near_pairs(numpy.arange(9, dtype=numpy.uint64))"
ARG ML_CODE_VERSION=unknown
ENV ML_CODE_VERSION=${ML_CODE_VERSION}
