#!/usr/bin/env bash
# MLflow tracking server for ehrfm, in the foreground (what the Kubernetes Deployment runs too).
#   Embedded default: SQLite + local artifacts under ${EHRFM_MLFLOW_DIR:-~/.ehrfm/mlflow}, loopback,
#   port ${EHRFM_MLFLOW_PORT:-5005}, one worker.
#   Cluster (every variable is passed through by ehrfm.tracking):
#     EHRFM_MLFLOW_BACKEND_STORE_URI      postgresql+psycopg2://mlflow@db:5432/mlflow (password in PGPASSWORD)
#     EHRFM_MLFLOW_ARTIFACTS_DESTINATION  s3://bucket/mlflow (AWS_* credentials; MLFLOW_S3_ENDPOINT_URL for MinIO)
#     EHRFM_MLFLOW_HOST=0.0.0.0  EHRFM_MLFLOW_PORT=5000  EHRFM_MLFLOW_WORKERS=4
#     EHRFM_MLFLOW_ALLOWED_HOSTS          Host headers clients use, e.g. mlflow,mlflow.ehrfm.svc.cluster.local:5000
#   See mlflow/README.md and docs/OPERATIONS.md.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
exec "$py" -m ehrfm.tracking serve "$@"
