#!/usr/bin/env bash
# #16's GPU measurement as one device call: install the carried wheels when Ray or DeepSpeed is
# missing (../shared/gpu/README.md builds .gpu-wheels/), then bench/gpu_pretrain.py.
# Usage, from the project root on the GPU machine:
#   bench/gpu_pretrain.sh DATA OUT [bench/gpu_pretrain.py options]     (PYTHON: default python3)
set -uo pipefail
data=${1:?usage: bench/gpu_pretrain.sh DATA OUT [options]}
out=${2:?usage: bench/gpu_pretrain.sh DATA OUT [options]}
shift 2
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_AUTH_MODE=token
if ! "$python" -c "import ray, deepspeed, pydantic" 2>/dev/null; then
  if [ ! -d .gpu-wheels ]; then
    echo "Ray/DeepSpeed/pydantic missing and no .gpu-wheels/ to install them from" >&2
    exit 2
  fi
  "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-wheels/*.whl \
    > "$out/pip.log" 2>&1 || { tail -20 "$out/pip.log" >&2; exit 2; }
  export PYTHONPATH="/tmp/site:$PYTHONPATH" PATH="/tmp/site/bin:$PATH"
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
# fail in seconds, not after a Ray start, when the machine lacks a module the job imports
if ! "$python" -c "import ehrfm.training.pretrain, ehrfm.training.pretrain_loop, ehrfm.cli" > "$out/preflight.txt" 2>&1; then
  tail -5 "$out/preflight.txt" >&2
  exit 2
fi
exec "$python" bench/gpu_pretrain.py --data "$data" --out "$out" "$@"
