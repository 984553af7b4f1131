"""Test session setup: eight simulated CPU devices, fast compilation, a private cache.

Set before jax is imported anywhere; subprocesses started by tests inherit them, so a
command-line run and an in-process run of the same config compute the same bits.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The tests' programs are tiny: compile time dominates, so skip most XLA optimizations.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
# A persistent compilation cache of this session (not the user's ~/.cache): runs of
# main.py started by tests store every executable, and restarted ones load them, as
# a resumed training run does.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='ec2t_jax_xla_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

# Everything below is shared by several test modules: fixtures, not imports between
# test files. Imports of the package come after the environment above is set.
import math  # noqa: E402
import signal  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def counting_jit(tx):
  """`tx.update` under `jax.jit`, and the list that grows by one per trace."""
  traces = []

  @jax.jit
  def update(g, s, p):
    traces.append(1)
    return tx.update(g, s, p)

  return update, traces


# configs/mnist.py:smoke made smaller: 3 steps per epoch, one epoch per stage.
TINY_OVERRIDES = {
  'steps_per_epoch': 3,
  'batch_size': 32,
  'eval_batch_size': 64,
  'num_eval_examples': 128,
  'fp.num_epochs': 1,
  'ec2t.num_epochs': 1,
  'ec2t.frozen_epochs': 1,
  'log_every_steps': 2,
  'checkpoint_every_steps': 2,
}


def make_tiny_mnist(**overrides):
  """The tiny MNIST config; `overrides` set fields by dotted name (`**{'ec2t.gamma': 0.3}`)."""
  from configs import mnist

  config = mnist.get_config('smoke')
  for key, value in {**TINY_OVERRIDES, **overrides}.items():
    target = config
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


@pytest.fixture(scope='session')
def repo_root() -> str:
  """The repository's root directory (where main.py is)."""
  return REPO


@pytest.fixture(scope='session')
def tiny_flags() -> list[str]:
  """Command-line flags of `main.py` that give the `tiny_mnist()` config."""
  flags = ['--config=configs/mnist.py:smoke']
  return flags + [f'--config.{key}={value}' for key, value in TINY_OVERRIDES.items()]


@pytest.fixture(scope='session')
def tiny_mnist():
  """The factory of tiny MNIST configs (see `make_tiny_mnist`)."""
  return make_tiny_mnist


@pytest.fixture(scope='session')
def trained_workdir(tmp_path_factory) -> str:
  """One finished tiny MNIST run per test session (per xdist worker), read-only for tests."""
  from ec2t_jax.training import train

  path = str(tmp_path_factory.mktemp('tiny_mnist_workdir') / 'run')
  train.train_and_evaluate(make_tiny_mnist(), path)
  return path


@pytest.fixture
def sigterm_at(monkeypatch):
  """`arm(n)`: the trainer receives SIGTERM when it shards its n-th training input.

  `arm` returns `{'n': ...}`, the count of training inputs sharded so far (one per
  compiled call); `arm(0)` only counts.
  """
  from ec2t_jax.training import train

  def arm(at_call: int) -> dict[str, int]:
    original = train.to_global
    calls = {'n': 0}

    def to_global(batch, sharding):
      if 'mask' not in batch:  # Training batches only; evaluation batches carry a mask.
        calls['n'] += 1
        if calls['n'] == at_call:
          os.kill(os.getpid(), signal.SIGTERM)
      return original(batch, sharding)

    monkeypatch.setattr(train, 'to_global', to_global)
    return calls

  return arm


def _abstract_variables(name, num_classes):
  from ec2t_jax import models

  model = models.create(name, num_classes=num_classes)
  x = jax.ShapeDtypeStruct((1, *models.input_shape(name)), jnp.float32)
  return model, jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def _synthetic_variables(shapes, sparsity, is_ternary, seed=0):
  """Real values for abstract variables: ternary kernels with exactly `sparsity` zeros
  at random positions (the same in every layer), normal values elsewhere."""
  from ec2t_jax import tree_util

  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = tree_util.path_str(path)
    n = math.prod(leaf.shape)
    if is_ternary(name):
      a = np.zeros(n)
      idx = rng.permutation(n)
      zeros = int(round(sparsity * n))
      a[idx[zeros:]] = rng.choice([-1.0, 1.0], size=n - zeros)
      return np.where(a > 0, 0.3, np.where(a < 0, -0.25, 0.0)).reshape(leaf.shape).astype('f4')
    value = rng.standard_normal(leaf.shape) * 0.1 + (1.0 if name.endswith('var') else 0.0)
    return value.astype('f4')

  return jax.tree_util.tree_map_with_path(make, shapes)


def _is_body_conv(name):
  return name.startswith('params/layer') and '/conv' in name and name.endswith('kernel')


@pytest.fixture(scope='session')
def abstract_variables():
  """`f(model_name, num_classes) -> (model, abstract variables)` of a registered model."""
  return _abstract_variables


@pytest.fixture(scope='session')
def synthetic_variables():
  """`f(abstract, sparsity, is_ternary, seed=0)`: values for abstract variables."""
  return _synthetic_variables


@pytest.fixture(scope='session')
def is_body_conv():
  """`f(path) -> bool`: the ResNet body convs (`params/layer*/.../conv*/kernel`)."""
  return _is_body_conv
