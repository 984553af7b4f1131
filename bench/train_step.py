"""The trainer's EC2T step on CPU: k steps per call against one, and distillation's cost.

    python bench/train_step.py per_call [--model resnet20] [--batch 8] [--ks 1,8]
    python bench/train_step.py distill  [--model lenet5] [--batch 256]

`per_call` runs `ec2t_jax.training.steps.train_step` (one step per call, as
`config.steps_per_call=1`) and `scan_steps` (k steps per call); `distill` runs
`train_step` without and with a teacher (the same network in eval mode,
`config.distill`). Both sides run in this one process on random images,
interleaved, and the script prints the median time per step of each and the
ratio. A small batch makes the host's share of a step (dispatch, handling of
every params and optimizer-state array) visible; that share is what k > 1
divides by k.
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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ec2t_jax  # noqa: E402
from ec2t_jax import models  # noqa: E402
from ec2t_jax.training import setup as setup_lib  # noqa: E402
from ec2t_jax.training import steps as steps_lib  # noqa: E402

SHAPES = {'lenet5': (28, 28, 1)}  # Input shape per model; others take CIFAR's 32x32x3.


def _shape(model_name: str) -> tuple[int, int, int]:
  return SHAPES.get(model_name, (32, 32, 3))


def _state(model_name: str, batch: int):
  model = models.create(model_name, num_classes=10)
  images = jnp.zeros((batch, *_shape(model_name)), jnp.float32)
  variables = model.init(jax.random.key(0), images, train=False)
  mask = ec2t_jax.default_ternary_mask(variables['params'])
  state = setup_lib.TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    tx=ec2t_jax.ec2t(mask),
    batch_stats=variables.get('batch_stats', {}),
  )
  return state, model, variables


def _batches(batch: int, k: int, seed: int, shape=(32, 32, 3)):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((k, batch, *shape)).astype(np.float32)
  labels = rng.integers(0, 10, (k, batch)).astype(np.int32)
  return {'image': images, 'label': labels}


def _time(sides: dict[str, Any], states: dict[str, Any], calls: int, rounds: int):
  """Compiles each side, then times `calls` calls per side and round, interleaved.

  `sides[name] = (call(state, i) -> state, steps_per_call)`. Returns the first
  call's seconds and the seconds per step of every round, by side.
  """
  compile_s, per_step = {}, {name: [] for name in sides}
  for name, (call, _) in sides.items():  # Compile (and warm) each program once.
    start = time.perf_counter()
    states[name] = jax.block_until_ready(call(states[name], 0))
    compile_s[name] = time.perf_counter() - start
  for _ in range(rounds):
    for name, (call, k) in sides.items():  # Interleaved: a busy machine slows all alike.
      start = time.perf_counter()
      for i in range(calls):
        states[name] = call(states[name], i)
      jax.block_until_ready(states[name])
      per_step[name].append((time.perf_counter() - start) / (calls * k))
  return compile_s, per_step


def _per_call_sides(args, one, base_rng):
  ks = [int(k) for k in args.ks.split(',')]
  p_one = jax.jit(one, donate_argnums=(0,))
  p_many = jax.jit(
    functools.partial(steps_lib.scan_steps, one, unroll=args.unroll), donate_argnums=(0,)
  )
  shape = _shape(args.model)
  sides, states = {}, {}
  for k in ks:
    data = _batches(args.batch, k, k, shape)
    states[f'k={k}'] = _state(args.model, args.batch)[0]
    if k == 1:
      batch = {name: v[0] for name, v in data.items()}
      sides['k=1'] = (
        lambda state, i, batch=batch: p_one(state, batch, steps_lib.step_rng(base_rng, i))[0],
        1,
      )
    else:
      sides[f'k={k}'] = (
        lambda state, i, data=data, k=k: p_many(state, data, base_rng, np.uint32(i * k))[0],
        k,
      )
  return sides, states


def _distill_sides(args, one, base_rng):
  state, model, variables = _state(args.model, args.batch)
  # The network itself in eval mode, as its own arrays (the student's are donated).
  teacher = (jax.tree.map(jnp.copy, variables), np.float32(4.0), np.float32(0.5))
  p_plain = jax.jit(one, donate_argnums=(0,))
  p_kd = jax.jit(functools.partial(one, teacher_apply=model.apply), donate_argnums=(0,))
  batch = {name: v[0] for name, v in _batches(args.batch, 1, 0, _shape(args.model)).items()}
  sides = {
    'without teacher': (lambda s, i: p_plain(s, batch, steps_lib.step_rng(base_rng, i))[0], 1),
    'with teacher': (
      lambda s, i: p_kd(s, batch, steps_lib.step_rng(base_rng, i), teacher)[0],
      1,
    ),
  }
  states = {'without teacher': state, 'with teacher': _state(args.model, args.batch)[0]}
  return sides, states


def main(argv=None):
  """Times both sides of one comparison; prints a markdown table; `--json FILE` the numbers."""
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('comparison', choices=('per_call', 'distill'))
  parser.add_argument('--model', default='')
  parser.add_argument('--batch', type=int, default=0)
  parser.add_argument('--ks', default='1,8', help='per_call: steps per call (the first is 1)')
  parser.add_argument(
    '--unroll',
    type=int,
    default=-1,
    help='per_call: 1 unrolls the k steps, 0 keeps a loop; -1 (default) as the trainer does',
  )
  parser.add_argument('--calls', type=int, default=20, help='timed calls per side and round')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--json', default='')
  args = parser.parse_args(argv)
  per_call = args.comparison == 'per_call'
  args.unroll = steps_lib.default_unroll() if args.unroll < 0 else bool(args.unroll)
  args.model = args.model or ('resnet20' if per_call else 'lenet5')
  args.batch = args.batch or (8 if per_call else 256)
  one = functools.partial(steps_lib.train_step, skip_nonfinite=False)
  base_rng = jax.random.key(1)
  sides, states = (_per_call_sides if per_call else _distill_sides)(args, one, base_rng)
  compile_s, per_step = _time(sides, states, args.calls, args.rounds)
  median = {name: statistics.median(v) for name, v in per_step.items()}
  first = next(iter(median))
  unrolled = f', unroll={args.unroll}' if per_call else ''
  print(
    f'{args.model}, batch {args.batch}, {jax.devices()[0].device_kind}, jax {jax.__version__}'
    f'{unrolled}'
  )
  print(
    f'| {args.comparison} | ms per step (median of rounds) | ratio to {first} | first call (s) |'
  )
  print('|---|---|---|---|')
  for name, value in median.items():
    print(f'| {name} | {1e3 * value:.2f} | {value / median[first]:.2f} | {compile_s[name]:.1f} |')
  if args.json:
    record = {
      'comparison': args.comparison,
      'model': args.model,
      'batch': args.batch,
      'unroll': args.unroll if per_call else None,
      'device': jax.devices()[0].device_kind,
      'platform': platform.platform(),
      'jax': jax.__version__,
      'per_step_s': per_step,
      'first_call_s': compile_s,
    }
    with open(args.json, 'w') as f:
      json.dump(record, f, indent=1)
  return median


if __name__ == '__main__':
  main()
