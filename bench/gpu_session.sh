#!/usr/bin/env bash
# One device session: the issue #7 benchmarks on a GPU (bench/performance.py).
# Usage on a GPU machine with jax/flax/optax installed: OUT=dir bash bench/gpu_session.sh
set -u
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())" 2>&1 | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/versions.txt"
B="python3 bench/performance.py"
timeout 150 $B step --models lenet5,resnet20 --steps 30 --json "$OUT/step_small.json" 2>&1 | grep -v Warning | tail -7
timeout 120 $B compile --models resnet20,micronet_c100 --json "$OUT/compile.json" 2>&1 | grep -v Warning | tail -5
timeout 120 $B step --models micronet_c100 --steps 20 --json "$OUT/step_micronet.json" 2>&1 | grep -v Warning | tail -5
timeout 60 $B update --json "$OUT/update.json" 2>&1 | grep -v Warning | tail -6
timeout 40 $B eval --models lenet5,resnet20,micronet_c100 --batch 1024 --json "$OUT/eval.json" 2>&1 | grep -v Warning | tail -6
