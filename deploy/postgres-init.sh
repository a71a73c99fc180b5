#!/usr/bin/env bash
# First start of Postgres: a second database, for MLflow's tracking store and model registry.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE DATABASE mlflow;
SQL
