#!/usr/bin/env bash
# One device session: the step benchmark (float32, bfloat16) and the MNIST recipe sweep.
# Usage on a GPU machine with jax/flax/optax installed: OUT=dir bash bench/gpu_session.sh
set -u
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())" 2>&1 | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/versions.txt"
for dt in float32 bfloat16; do
  timeout 90 python3 bench/step_overhead.py --model resnet20 --dtype $dt --steps 30 \
    --json "$OUT/step_resnet20_$dt.json" 2>&1 | grep -v Warning | tail -2
done
timeout 270 python3 bench/mnist_sweep.py --grid default --out "$OUT/mnist_sweep.jsonl" 2>&1 | grep -v Warning | tail -12
for dt in float32 bfloat16; do
  timeout 70 python3 bench/step_overhead.py --model micronet_c100 --dtype $dt --steps 15 \
    --json "$OUT/step_micronet_$dt.json" 2>&1 | grep -v Warning | tail -2
done
