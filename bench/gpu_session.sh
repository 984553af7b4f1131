#!/usr/bin/env bash
# One device session on a GPU: the step-time and optimizer-update benchmarks of
# docs/benchmarks.md (EC2T against plain Adam; bench/performance.py).
# Usage on a GPU machine with jax/flax/optax installed: OUT=dir bash bench/gpu_session.sh
set -u
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())" 2>&1 | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/versions.txt"
B="python3 bench/performance.py"
run() { local t=$1; shift; echo "# $*"; timeout "$t" $B "$@" 2>&1 | grep -v Warning | tail -8; }
run 150 step --models lenet5,resnet20 --steps 30 --json "$OUT/step_small.json"
run 60 step --models resnet20 --dtypes float32 --steps 30 --fence_updates 0 --json "$OUT/step_resnet20_nofence.json"
run 200 step --models micronet_c100 --dtypes float32 --steps 20 --json "$OUT/step_micronet.json"
run 150 update --json "$OUT/update.json"
