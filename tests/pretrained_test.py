"""Tests for ec2t_jax.training.pretrained: growing a trained base into the super-network."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ec2t_jax import models
from ec2t_jax.configs import default
from ec2t_jax.models import grow as grow_lib
from ec2t_jax.training import checkpoint, pretrained
from ec2t_jax.training import parse as parse_lib
from ec2t_jax.training import variables as variables_lib

IMAGE_SHAPE = (32, 32, 3)
# Base: 1 block per stage, widths 8/16/32; target: 2 blocks per stage, widths 16/24/48.
BASE_KWARGS = {'depth_mult': 0.1, 'width_mult': 0.5}
TARGET_KWARGS = {'depth_mult': 0.2, 'width_mult': 0.75}


def _config(**overrides):
  config = default.get_config()
  if 'grow' not in config:  # Until configs/default.py has the fields.
    config.grow = ml_collections.ConfigDict(
      {'base_model': '', 'base_model_kwargs': {}, 'split': 'equal', 'seed': 0}
    )
  config.model = 'micronet'
  config.model_kwargs = ml_collections.ConfigDict(TARGET_KWARGS)
  config.num_classes = 10
  config.grow.base_model = 'micronet'
  config.grow.base_model_kwargs = ml_collections.ConfigDict(BASE_KWARGS)
  config.init_from = '/nonexistent/base'
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    target = config
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def _perturbed(variables, seed=0):
  """Variables of a 'trained' network: random BatchNorm statistics and affine parameters."""
  rng = np.random.default_rng(seed)

  def perturb(path, x):
    name = path[-1].key
    if name in ('scale', 'var'):
      return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
    if name in ('bias', 'mean'):
      return jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype)
    return x

  return jax.tree_util.tree_map_with_path(perturb, variables)


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  """A tiny MicroNet with non-trivial BatchNorm, saved as `save_variables` writes it."""
  model = models.create('micronet', num_classes=10, **BASE_KWARGS)
  assert (model.blocks_per_stage, model.widths) == (1, (8, 16, 32))
  variables = _perturbed(variables_lib.initial_variables(model, IMAGE_SHAPE, seed=1))
  path = os.path.join(tmp_path_factory.mktemp('base'), 'micronet')
  checkpoint.save_variables(path, variables)
  return model, variables, path


def _logits(model, variables, seed=5):
  x = jax.random.normal(jax.random.key(seed), (8, *IMAGE_SHAPE))
  f32 = model.clone(dtype=jnp.float32)
  return np.asarray(f32.apply(variables, x, train=False), np.float32)


def _grow(config):
  spec = parse_lib.model_spec(config)
  model = variables_lib.create_model(spec, 10)
  template = variables_lib.initial_variables(model, IMAGE_SHAPE, config.seed)
  grown = pretrained.grow_from_pretrained(
    spec,
    seed=config.seed,
    network=model,
    variables=template,
    image_shape=IMAGE_SHAPE,
    num_classes=10,
  )
  return model, template, grown


def _validate(config):
  """`validate_grow` as `spec.parse` calls it."""
  pretrained.validate_grow(
    parse_lib.model_spec(config), num_classes=config.get('num_classes') or 10, seed=config.seed
  )


def test_grown_network_computes_the_base_function(base, caplog):
  base_model, base_vars, path = base
  config = _config(init_from=path)
  _validate(config)
  with caplog.at_level('INFO'):
    model, template, grown = _grow(config)
  assert (model.blocks_per_stage, model.widths) == (2, (16, 24, 48))
  # Same leaves, shapes and dtypes as the fresh super-network.
  spec = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)  # noqa: E731
  assert spec(grown) == spec(template)
  want, got = _logits(base_model, base_vars), _logits(model, grown)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # The base's statistics carried over (channel 0 keeps its index); the new block is an identity.
  np.testing.assert_array_equal(
    grown['batch_stats']['layer1_0']['bn1']['mean'][:8],
    base_vars['batch_stats']['layer1_0']['bn1']['mean'],
  )
  np.testing.assert_array_equal(grown['params']['layer3_1']['bn3']['scale'], 0.0)
  assert 'max |logit difference|' in caplog.text and '(2 blocks per stage' in caplog.text


def test_half_precision_and_random_split(base):
  base_model, base_vars, path = base
  config = _config(init_from=path, half_precision=True, **{'grow.split': 'random', 'grow.seed': 3})
  model, template, grown = _grow(config)
  assert model.dtype == jnp.bfloat16
  assert jax.tree.map(lambda x: x.dtype, grown) == jax.tree.map(lambda x: x.dtype, template)
  np.testing.assert_allclose(
    _logits(model, grown), _logits(base_model, base_vars), rtol=1e-4, atol=1e-4
  )


def test_broken_growth_fails_the_logits_check(base, monkeypatch):
  _, _, path = base
  real_grow = grow_lib.grow

  def noisy_grow(*args, **kwargs):
    grown = real_grow(*args, **kwargs)
    kernel = grown['params']['linear']['kernel']
    grown['params']['linear']['kernel'] = kernel + 0.1
    return grown

  monkeypatch.setattr(grow_lib, 'grow', noisy_grow)
  with pytest.raises(ValueError, match=r'max \|logit difference\| [0-9.e+-]+ on 4 fixed images'):
    _grow(_config(init_from=path))


def test_init_from_of_another_base_names_the_base(base):
  _, _, path = base
  config = _config(init_from=path, **{'grow.base_model_kwargs.width_mult': 0.25})
  with pytest.raises(
    ValueError, match=r"does not fit the model.*config.grow.base_model='micronet'"
  ):
    _grow(config)


@pytest.mark.parametrize(
  'overrides, match',
  [
    ({'init_from': ''}, r"config.grow.base_model='micronet' .*config.init_from is empty"),
    ({'grow.base_model': 'micronett'}, r"config.grow.base_model='micronett': unknown model"),
    ({'grow.split': 'half'}, r"config.grow.split='half' is not a split; valid: 'equal', 'random'"),
    (
      {'model': 'efficientnet_b0', 'model_kwargs': ml_collections.ConfigDict()},
      r"config.model='efficientnet_b0' builds EfficientNet, .*valid: .*micronet_c100",
    ),
    (
      {'grow.base_model': 'resnet20', 'grow.base_model_kwargs': ml_collections.ConfigDict()},
      r"'resnet20' builds CifarResNet but config.model='micronet' builds MicroNet.*"
      'valid base models: micronet, micronet_c10, micronet_c100',
    ),
    (
      {'model_kwargs.width_mult': 0.25},
      r"cannot grow config.grow.base_model='micronet' .*\(1 blocks per stage, widths \(8, 16, "
      r"32\)\) into config.model='micronet' .*widths \(8, 8, 16\)\): .*cannot grow axis",
    ),
  ],
)
def test_validate_errors(overrides, match):
  config = _config(**overrides)
  with pytest.raises(ValueError, match=match) as e:
    _validate(config)
  assert '\n' not in str(e.value)


def test_validate_names_both_models_when_the_target_is_shallower():
  config = _config(**{'grow.base_model_kwargs.depth_mult': 0.3, 'model_kwargs.depth_mult': 0.1})
  with pytest.raises(
    ValueError,
    match=r"base_model='micronet' .*\(3 blocks per stage.*config.model='micronet' .*\(1 blocks "
    r'per stage.*: stage 1: the big model has 1 blocks, fewer than the small model \(3\)',
  ):
    _validate(config)


def test_validate_accepts_growable_configs_and_no_growth():
  _validate(_config())
  _validate(_config(**{'grow.base_model': ''}))
  config = _config(model='resnet32', model_kwargs=ml_collections.ConfigDict())
  config.grow.base_model = 'resnet20'
  config.grow.base_model_kwargs = ml_collections.ConfigDict()
  _validate(config)
  config = _config(model='micronet_c100', model_kwargs=ml_collections.ConfigDict())
  config.grow.base_model_kwargs = ml_collections.ConfigDict()  # The paper's d = w = 1 base.
  _validate(config)


def test_compound_kwargs():
  kwargs = pretrained.compound_kwargs(1.4, 1.2, 3.5)
  paper = models.create('micronet_c100', num_classes=100)
  model = models.create('micronet', num_classes=100, **kwargs)
  assert (model.blocks_per_stage, model.widths) == (paper.blocks_per_stage, paper.widths)
  assert pretrained.compound_kwargs(2.0, 1.0, 1.0, depth_mult=0.5) == {
    'depth_mult': 1.0,
    'width_mult': 1.0,
  }
  with pytest.raises(ValueError, match=r'd >= 1, w >= 1 and phi >= 0 .*got d=0.9, w=1.2, phi=1'):
    pretrained.compound_kwargs(0.9, 1.2, 1)


@pytest.mark.parametrize('grow_seed, seed, want', [(0, 7, 7), (3, 7, 3)])
def test_grow_seed_zero_is_the_run_seed(monkeypatch, grow_seed, seed, want):
  real_grow, rngs = grow_lib.grow, []

  def recording_grow(*args, **kwargs):
    rngs.append((kwargs['rng'], kwargs['split']))
    return real_grow(*args, **kwargs)

  monkeypatch.setattr(grow_lib, 'grow', recording_grow)
  config = _config(seed=seed, **{'grow.seed': grow_seed, 'grow.split': 'random'})
  _validate(config)
  assert rngs == [(want, 'random')]


def test_no_growth_needs_no_base():
  spec = parse_lib.model_spec(_config(**{'grow.base_model': ''}))
  assert spec.grow_base_model == ''
  pretrained.validate_grow(spec, num_classes=10, seed=0)
  with pytest.raises(ValueError, match=r"needs config.grow.base_model, got ''"):
    pretrained.grow_from_pretrained(
      spec, seed=0, network=None, variables={}, image_shape=IMAGE_SHAPE, num_classes=10
    )
