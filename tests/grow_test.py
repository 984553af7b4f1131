"""Tests for ec2t_jax.models.grow: function-preserving depth and width growth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ec2t_jax import models
from ec2t_jax.models import grow


def _trained_like(model, seed=0):
  """Random variables: He-normal kernels, random BN affine and statistics (numpy, no init)."""
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      value = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    elif name in ('scale', 'var'):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      value = 0.1 * rng.standard_normal(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree.map_with_path(fill, shapes)


def _logits(model, variables, seed=1):
  x = jax.random.normal(jax.random.key(seed), (8, 32, 32, 3))
  return np.asarray(model.apply(variables, x, train=False))


def _assert_preserved(small, big, **kwargs):
  small_vars = _trained_like(small)
  big_vars = grow.grow(small_vars, small, big, **kwargs)
  assert jax.tree.map(jnp.shape, big_vars) == jax.tree.map(jnp.shape, _trained_like(big))
  want, got = _logits(small, small_vars), _logits(big, big_vars)
  assert np.abs(want).max() > 0.1  # Not a trivially small output.
  err = float(np.abs(got - want).max())
  print(
    f'{type(small).__name__} grow max |Δlogit| {err:.2e} (max |logit| {np.abs(want).max():.2f})'
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  return small_vars, big_vars


def test_micronet_wider_and_deeper():
  small = models.create('micronet', num_classes=10, depth_mult=0.1, width_mult=0.5)
  big = models.create('micronet', num_classes=10, depth_mult=0.3, width_mult=1.0)
  assert (small.blocks_per_stage, small.widths) == (1, (8, 16, 32))
  assert (big.blocks_per_stage, big.widths) == (3, (16, 32, 64))
  _, big_vars = _assert_preserved(small, big)
  new = big_vars['params']['layer2_2']
  np.testing.assert_array_equal(new['bn3']['scale'], 0.0)
  np.testing.assert_array_equal(new['bn3']['bias'], 0.0)
  assert np.abs(new['conv1']['kernel']).max() > 0  # Other params keep their random init.


def test_micronet_wider_random_split_uneven_replication():
  # 8 -> 24 channels etc.: every old channel copied two or three times.
  small = models.create('micronet', num_classes=10, depth_mult=0.1, width_mult=0.5)
  big = models.create('micronet', num_classes=10, depth_mult=0.1, width_mult=1.4)
  assert big.widths == (24, 48, 88)
  small_vars, big_vars = _assert_preserved(small, big, split='random', rng=jax.random.key(3))
  # Copies of a channel are no longer identical in the layer that reads them.
  w = np.asarray(big_vars['params']['layer1_0']['conv1']['kernel'])
  assert not any(np.allclose(w[:, :, 0], w[:, :, k]) for k in range(8, 24))
  # The old channels keep their index: the first 8 output filters are copies.
  old = np.asarray(small_vars['params']['layer1_0']['bn1']['scale'])
  np.testing.assert_array_equal(big_vars['params']['layer1_0']['bn1']['scale'][:8], old)


def test_resnet20_to_resnet56():
  small = models.create('resnet20', num_classes=10)
  big = models.create('resnet56', num_classes=10)
  small_vars, big_vars = _assert_preserved(small, big)
  np.testing.assert_array_equal(
    big_vars['params']['layer3_2']['conv2']['kernel'],
    small_vars['params']['layer3_2']['conv2']['kernel'],
  )
  np.testing.assert_array_equal(big_vars['params']['layer3_8']['bn2']['scale'], 0.0)


@pytest.mark.parametrize(
  'small, big, match',
  [
    (
      models.create('resnet56', num_classes=10),
      models.create('resnet20', num_classes=10),
      'stage 1: the big model has 3 blocks, fewer than the small model \\(9\\)',
    ),
    (
      models.create('micronet', num_classes=10, depth_mult=0.1, width_mult=1.0),
      models.create('micronet', num_classes=10, depth_mult=0.1, width_mult=0.5),
      r'params/bn1/bias: cannot grow axis 0 from 16 to 8 \(shape \(16,\) -> \(8,\)',
    ),
    (
      models.create('resnet20', num_classes=10),
      models.create('resnet56', num_classes=100),
      'num_classes must be equal in both models, got 10 and 100',
    ),
    (
      models.create('resnet20', num_classes=10),
      models.create('micronet', num_classes=10),
      'same class among .*CifarResNet.*got CifarResNet -> MicroNet',
    ),
    (
      models.create('lenet5', num_classes=10),
      models.create('lenet5', num_classes=10),
      'got LeNet5 -> LeNet5',
    ),
  ],
)
def test_errors(small, big, match):
  x = jnp.zeros((1, 28, 28, 1) if isinstance(small, models.LeNet5) else (1, 32, 32, 3))
  variables = jax.eval_shape(lambda: small.init(jax.random.key(0), x, train=False))
  with pytest.raises(ValueError, match=match):
    grow.grow(variables, small, big)


def test_unknown_split():
  model = models.create('resnet20', num_classes=10)
  with pytest.raises(ValueError, match=r"split must be one of \['equal', 'random'\], got 'half'"):
    grow.grow({}, model, model, split='half')


def test_rng_makes_new_blocks_and_maps_reproducible():
  small = models.create('micronet', num_classes=10, depth_mult=0.1, width_mult=0.5)
  big = models.create('micronet', num_classes=10, depth_mult=0.2, width_mult=0.7)
  small_vars = _trained_like(small)
  a = grow.grow(small_vars, small, big, rng=jax.random.key(1))
  b = grow.grow(small_vars, small, big, rng=jax.random.key(1))
  c = grow.grow(small_vars, small, big, rng=7)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.array_equal(
    a['params']['layer1_1']['conv1']['kernel'], c['params']['layer1_1']['conv1']['kernel']
  )
  new_bn3 = a['batch_stats']['layer1_1']['bn3']
  np.testing.assert_array_equal(new_bn3['var'], 1.0)  # Statistics stay standard.


def test_resnet18_to_resnet34():
  small = models.create('resnet18', num_classes=10)
  big = models.create('resnet34', num_classes=10)
  _assert_preserved(small, big)


def test_basic_to_bottleneck_is_refused():
  small = models.create('resnet34', num_classes=10)
  big = models.create('resnet50', num_classes=10)
  with pytest.raises(
    ValueError, match="block must be equal in both models, got 'basic' and 'bottleneck'"
  ):
    grow.grow({}, small, big)
