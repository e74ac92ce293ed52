#!/usr/bin/env bash
# A multi-node Ray cluster on this machine (head + N workers, token auth, dashboard on loopback).
#   cluster/local.sh up [--workers N] [--worker-cpus C] [--dashboard-port P] [--mlflow]
#   cluster/local.sh status | env | down          (all take --state-dir, default ~/.ehrfm/cluster)
# Clients: eval "$(cluster/local.sh env)" then `ray job submit --working-dir . ...`; see docs/OPERATIONS.md.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
exec "$py" -m ehrfm.cluster "$@"
