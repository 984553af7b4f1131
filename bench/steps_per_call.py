"""Per-step time of the trainer's step with k = 1 and k = 8 steps per compiled call.

    python bench/steps_per_call.py [--model resnet20] [--batch 8] [--ks 1,8] [--calls 20]

Runs `ec2t_jax.training.steps.train_step` (one step per call, as
`config.steps_per_call=1`) and `scan_steps` (k steps per call) with the EC2T
optimizer on random images, all in this one process, interleaved, and prints
the median time per step of each k and its ratio to k = 1. A small batch makes
the host's share of a step (dispatch, argument handling for every params and
optimizer-state array) visible; that share is what k > 1 divides by k.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ec2t_jax  # noqa: E402
from ec2t_jax import models  # noqa: E402
from ec2t_jax.training import setup as setup_lib  # noqa: E402
from ec2t_jax.training import steps as steps_lib  # noqa: E402


def _state(model_name: str, batch: int):
  model = models.create(model_name, num_classes=10)
  images = jnp.zeros((batch, 32, 32, 3), jnp.float32)
  variables = model.init(jax.random.key(0), images, train=False)
  mask = ec2t_jax.default_ternary_mask(variables['params'])
  state = setup_lib.TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    tx=ec2t_jax.ec2t(mask),
    batch_stats=variables.get('batch_stats', {}),
  )
  return state


def _batches(batch: int, k: int, seed: int):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((k, batch, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 10, (k, batch)).astype(np.int32)
  return {'image': images, 'label': labels}


def main(argv=None):
  """Times each k; prints a markdown table; `--json FILE` writes the raw numbers."""
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--model', default='resnet20')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--ks', default='1,8', help='steps per call to compare (the first is 1)')
  parser.add_argument('--calls', type=int, default=20, help='timed calls per k and round')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--json', default='')
  args = parser.parse_args(argv)
  ks = [int(k) for k in args.ks.split(',')]
  one = functools.partial(steps_lib.train_step, skip_nonfinite=False)
  p_one = jax.jit(one, donate_argnums=(0,))
  p_many = jax.jit(functools.partial(steps_lib.scan_steps, one), donate_argnums=(0,))
  base_rng = jax.random.key(1)
  states = {k: _state(args.model, args.batch) for k in ks}
  data = {k: _batches(args.batch, k, k) for k in ks}

  def call(k, state, step):
    if k == 1:
      batch = {name: v[0] for name, v in data[k].items()}
      return p_one(state, batch, steps_lib.step_rng(base_rng, step))[0]
    return p_many(state, data[k], base_rng, np.uint32(step))[0]

  compile_s = {}
  for k in ks:  # Compile (and warm) each program once.
    start = time.perf_counter()
    states[k] = jax.block_until_ready(call(k, states[k], 0))
    compile_s[k] = time.perf_counter() - start
  per_step = {k: [] for k in ks}
  for _ in range(args.rounds):
    for k in ks:  # Interleaved: a busy machine slows every k alike.
      start = time.perf_counter()
      for i in range(args.calls):
        states[k] = call(k, states[k], i * k)
      jax.block_until_ready(states[k])
      per_step[k].append((time.perf_counter() - start) / (args.calls * k))
  median = {k: statistics.median(v) for k, v in per_step.items()}
  print(f'{args.model}, batch {args.batch}, {jax.devices()[0].device_kind}, jax {jax.__version__}')
  print('| steps per call | ms per step (median of rounds) | ratio to k=1 | first call (s) |')
  print('|---|---|---|---|')
  for k in ks:
    ratio = median[k] / median[ks[0]]
    print(f'| {k} | {1e3 * median[k]:.2f} | {ratio:.2f} | {compile_s[k]:.1f} |')
  if args.json:
    record = {
      'model': args.model,
      'batch': args.batch,
      'device': jax.devices()[0].device_kind,
      'platform': platform.platform(),
      'jax': jax.__version__,
      'per_step_s': {str(k): v for k, v in per_step.items()},
      'first_call_s': {str(k): v for k, v in compile_s.items()},
    }
    with open(args.json, 'w') as f:
      json.dump(record, f, indent=1)
  return median


if __name__ == '__main__':
  main()
