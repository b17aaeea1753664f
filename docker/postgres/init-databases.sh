#!/bin/bash
# Runs once, on the first start of an empty data volume (docker-entrypoint-initdb.d): creates the
# MLflow backend-store database next to the service's own (POSTGRES_DB).
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE DATABASE "${MLFLOW_DB:-mlflow}" OWNER "$POSTGRES_USER";
SQL
