"""A fast sweep of the MNIST demo recipe (LeNet-5: full precision → EC2T → frozen).

    python bench/mnist_sweep.py --grid default [--out sweep.jsonl]

It reads the embedded MNIST arrays directly (no tfds, no grain) and runs each
epoch as one compiled `lax.scan`, so it runs where only jax/flax/optax are
installed, e.g. a GPU machine, and finishes a grid in minutes. It is a tool to
choose `configs/mnist.py`'s recipe; the numbers docs/benchmarks.md reports come from
`make demo` itself. Data split as the trainer's: the last 5,000 training
images are the validation split.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ec2t_jax
from ec2t_jax import models

NPZ = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'ec2t_jax', 'data', 'mnist.npz'
)


def load(validation_size: int = 5000):
  """Normalized train/val/test arrays as the input pipeline makes them (mean .1307, std .3081)."""
  with np.load(NPZ) as npz:

    def norm(x):
      return ((x.astype(np.float32) / 255.0 - 0.1307) / 0.3081)[..., None]

    xtr, ytr = norm(npz['train_images']), npz['train_labels'].astype(np.int32)
    xte, yte = norm(npz['test_images']), npz['test_labels'].astype(np.int32)
  n = len(xtr) - validation_size
  return (xtr[:n], ytr[:n]), (xtr[n:], ytr[n:]), (xte, yte)


def run(cfg: dict, data, fp_cache: dict) -> dict:
  """Trains one recipe; returns accuracies and sparsity."""
  (xtr, ytr), (xva, yva), (xte, yte) = data
  model = models.create('lenet5', num_classes=10)
  bs = cfg.get('batch_size', 256)
  steps = len(xtr) // bs
  xtr_d, ytr_d = jnp.asarray(xtr), jnp.asarray(ytr)

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({'params': p}, x), y).mean()

  def epoch(tx, params, opt_state, key):
    perm = jax.random.permutation(key, len(xtr))[: steps * bs].reshape(steps, bs)

    def body(carry, idx):
      p, s = carry
      loss, g = jax.value_and_grad(loss_fn)(p, xtr_d[idx], ytr_d[idx])
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss

    (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), perm)
    return params, opt_state, losses.mean()

  @jax.jit
  def accuracy(p, x, y):
    return jnp.mean(jnp.argmax(model.apply({'params': p}, x), -1) == y)

  fp_key = (cfg['fp_epochs'], cfg['fp_lr'], cfg.get('fp_wd', 0.0), cfg.get('seed', 0))
  key = jax.random.key(cfg.get('seed', 0))
  if fp_key not in fp_cache:
    params = model.init(key, jnp.zeros((1, 28, 28, 1)))['params']
    sched = optax.cosine_decay_schedule(cfg['fp_lr'], cfg['fp_epochs'] * steps)
    tx = optax.chain(optax.add_decayed_weights(cfg.get('fp_wd', 0.0)), optax.adam(sched))
    st = tx.init(params)
    step = jax.jit(functools.partial(epoch, tx))
    for e in range(cfg['fp_epochs']):
      params, st, _ = step(params, st, jax.random.fold_in(key, e))
    fp_cache[fp_key] = (params, float(accuracy(params, xte, yte)))
  params, fp_acc = fp_cache[fp_key]

  mask = ec2t_jax.default_ternary_mask(
    params, order=['conv1', 'conv2', 'fc1', 'fc2', 'fc3'], keep_first=False, keep_last=True
  )
  ec2t_steps = cfg['ec2t_epochs'] * steps
  tx = ec2t_jax.ec2t(
    mask,
    gamma=cfg['gamma'],
    init_scale=cfg['init_scale'],
    latent_optimizer=optax.adam(cfg.get('latent_lr', 1e-4)),
    centroid_optimizer=optax.adam(cfg.get('centroid_lr', 1e-5)),
    fp_optimizer=ec2t_jax.default_fp_optimizer(cfg.get('lr', 1e-4)),
    freeze_assignment_at=ec2t_steps,
    reference_parity=cfg.get('reference_parity', False),
  )
  st = tx.init(params)
  params = ec2t_jax.ternarize(params, st)
  step = jax.jit(functools.partial(epoch, tx))
  after_ec2t = None
  for e in range(cfg['ec2t_epochs'] + cfg['frozen_epochs']):
    params, st, _ = step(params, st, jax.random.fold_in(key, 1000 + e))
    if e + 1 == cfg['ec2t_epochs']:
      after_ec2t = float(accuracy(params, xte, yte))
  summary = ec2t_jax.summarize(st)
  return {
    **cfg,
    'fp_test_accuracy': fp_acc,
    'after_ec2t_test_accuracy': after_ec2t,
    'test_accuracy': float(accuracy(params, xte, yte)),
    'val_accuracy': float(accuracy(params, jnp.asarray(xva), jnp.asarray(yva))),
    'sparsity': summary['total_sparsity'],
  }


def _recipe(**kw):
  base = dict(fp_epochs=8, fp_lr=2e-3, gamma=0.15, init_scale=0.3, ec2t_epochs=10, frozen_epochs=5)
  return {**base, **kw}


GRIDS = {
  'default': [
    _recipe(gamma=0.15, init_scale=0.3),
    _recipe(gamma=0.15, init_scale=0.5),
    _recipe(gamma=0.3, init_scale=0.3),
    _recipe(gamma=0.3, init_scale=0.5),
    _recipe(gamma=0.5, init_scale=0.5),
    _recipe(fp_epochs=15, fp_wd=1e-4, gamma=0.15, init_scale=0.5),
    _recipe(fp_epochs=15, fp_wd=1e-4, gamma=0.3, init_scale=0.5),
    _recipe(gamma=0.15, init_scale=0.5, latent_lr=3e-4, lr=3e-4),
    _recipe(gamma=0.15, init_scale=0.5, reference_parity=True),
  ],
  'tiny': [_recipe(fp_epochs=1, ec2t_epochs=1, frozen_epochs=1)],
}


def main(argv=None):
  """Runs a grid and prints one JSON line per recipe."""
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--grid', default='default', choices=sorted(GRIDS))
  parser.add_argument(
    '--recipes', default='', help='JSON list of recipe overrides (replaces --grid)'
  )
  parser.add_argument('--out', default='')
  parser.add_argument('--limit', type=int, default=0, help='use the first N training images')
  args = parser.parse_args(argv)
  data = load()
  if args.limit:
    (xtr, ytr), val, test = data
    data = (xtr[: args.limit], ytr[: args.limit]), val, test
  cache: dict = {}
  print(f'devices: {jax.devices()}', flush=True)
  recipes = [_recipe(**r) for r in json.loads(args.recipes)] if args.recipes else GRIDS[args.grid]
  for cfg in recipes:
    t0 = time.time()
    result = {**run(cfg, data, cache), 'seconds': time.time() - t0}
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
      with open(args.out, 'a') as f:
        f.write(line + '\n')


if __name__ == '__main__':
  main()
