#!/usr/bin/env bash
# MLflow tracking server for ehrfm, in the foreground.
#   Embedded default: SQLite + local artifacts under ${EHRFM_MLFLOW_DIR:-~/.ehrfm/mlflow}, loopback,
#   port ${EHRFM_MLFLOW_PORT:-5005}.
#   Cluster: set EHRFM_MLFLOW_BACKEND_STORE_URI (e.g. postgresql://user@db/mlflow) and
#   EHRFM_MLFLOW_ARTIFACTS_DESTINATION (e.g. s3://bucket/mlflow), and EHRFM_MLFLOW_HOST=0.0.0.0
#   behind your ingress. See mlflow/README.md.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
exec "$py" -m ehrfm.tracking serve "$@"
