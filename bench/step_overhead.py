"""Median time of a jitted training step with `ec2t_jax.ec2t` versus plain `optax.adam`.

    python bench/step_overhead.py [--model resnet20] [--batch 128] [--steps 30]

Both steps (forward, backward, update) run in this one process on the same
synthetic CIFAR-style batch, interleaved in rounds so that drift of a shared
machine hits both alike. Prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import ec2t_jax
from ec2t_jax import models


def make_step(model, tx):
  """A jitted train step (forward, backward, optimizer update) for `tx`."""

  def step(params, batch_stats, opt_state, images, labels):
    def loss_fn(p):
      logits, updates = model.apply(
        {'params': p, 'batch_stats': batch_stats},
        images,
        train=True,
        mutable=['batch_stats'],
        rngs={'dropout': jax.random.key(1)},
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates['batch_stats']

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1, 2))


def main(argv=None):
  """Runs the benchmark and prints (and returns) the result."""
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--model', default='resnet20')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=30, help='timed steps per optimizer')
  parser.add_argument(
    '--dtype',
    default='float32',
    choices=['float32', 'bfloat16'],
    help='computation dtype (params and EC2T state stay float32)',
  )
  parser.add_argument('--json', default='', help='also write the result to this file')
  args = parser.parse_args(argv)

  dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  model = models.create(args.model, num_classes=10, dtype=dtype)
  shape = models.input_shape(args.model)
  key = jax.random.key(0)
  images = jax.random.normal(key, (args.batch, *shape))
  labels = jax.random.randint(key, (args.batch,), 0, 10)
  variables = jax.jit(lambda k: model.init(k, images[:1], train=False))(key)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  num_params = sum(x.size for x in jax.tree.leaves(params))

  order = ec2t_jax.masks.call_order(model, images[:1], train=False)
  mask = ec2t_jax.default_ternary_mask(params, order=order)
  optimizers = {'adam': optax.adam(1e-4), 'ec2t': ec2t_jax.ec2t(mask)}
  runs = {}
  for name, tx in optimizers.items():
    opt_state = tx.init(params)
    p = ec2t_jax.ternarize(params, opt_state) if name == 'ec2t' else params
    p, bs = jax.tree.map(jnp.copy, (p, batch_stats))
    step = make_step(model, tx)
    t0 = time.perf_counter()
    p, bs, opt_state, loss = step(p, bs, opt_state, images, labels)
    loss.block_until_ready()
    runs[name] = {'step': step, 'carry': (p, bs, opt_state), 'compile_s': time.perf_counter() - t0}
    runs[name]['times'] = []

  for _ in range(args.steps):  # Interleaved rounds: one step of each per round.
    for run in runs.values():
      p, bs, opt_state = run['carry']
      t0 = time.perf_counter()
      p, bs, opt_state, loss = run['step'](p, bs, opt_state, images, labels)
      loss.block_until_ready()
      run['times'].append(time.perf_counter() - t0)
      run['carry'] = (p, bs, opt_state)

  med = {name: statistics.median(run['times']) for name, run in runs.items()}
  result = {
    'model': args.model,
    'num_params': int(num_params),
    'batch': args.batch,
    'dtype': args.dtype,
    'steps': args.steps,
    'device': str(jax.devices()[0].device_kind),
    'machine': f'{platform.machine()}, {jax.local_device_count()} device(s)',
    'adam_median_s': med['adam'],
    'ec2t_median_s': med['ec2t'],
    'ratio': med['ec2t'] / med['adam'],
    'adam_images_per_s': args.batch / med['adam'],
    'ec2t_images_per_s': args.batch / med['ec2t'],
    'compile_s': {name: run['compile_s'] for name, run in runs.items()},
  }
  print(
    f'{args.model} ({num_params:,} params), batch {args.batch}, {args.dtype}, '
    f'{result["device"]}: '
    f'adam {med["adam"] * 1e3:.1f} ms/step, ec2t {med["ec2t"] * 1e3:.1f} ms/step, '
    f'ratio {result["ratio"]:.3f}'
  )
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == '__main__':
  main()
