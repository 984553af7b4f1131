"""Tests for ec2t_jax.models: registry, parameter counts, names, shapes, forward passes."""

import functools
import math
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ec2t_jax import models
from ec2t_jax.models import efficientnet, layers

# Parameter counts (params collection only) for the given number of classes.
EXPECTED = {
  # name: (num_classes, params)
  'lenet5': (10, 61_706),  # 156 + 2,416 + 48,120 + 10,164 + 850.
  'vit_tiny': (10, 138_890),  # The formula in tests/vit_test.py.
  # He et al. 2016, Table 6: 0.27M / 0.46M / 0.66M / 0.85M / 1.7M.
  'resnet20': (10, 269_722),
  'resnet32': (10, 464_154),
  'resnet44': (10, 658_586),
  'resnet56': (10, 853_018),
  'resnet110': (10, 1_727_962),
  'micronet': (10, 662_810),  # d = w = 1: 7 blocks of 16/32/64.
  # The published φ=3.5 super-net (docs/algorithm.md §8, ≈8.05M for CIFAR-100).
  'micronet_c10': (10, 8_044_234),
  'micronet_c100': (100, 8_055_124),
  # torchvision.
  'resnet18': (1000, 11_689_512),
  'resnet34': (1000, 21_797_672),
  'resnet50': (1000, 25_557_032),
  # efficientnet_pytorch.
  'efficientnet_b0': (1000, 5_288_548),
  'efficientnet_b1': (1000, 7_794_184),
  'efficientnet_b2': (1000, 9_109_994),
  'efficientnet_b3': (1000, 12_233_232),
  'efficientnet_b4': (1000, 19_341_616),
  'efficientnet_b5': (1000, 30_389_784),
  'efficientnet_b6': (1000, 43_040_704),
  'efficientnet_b7': (1000, 66_347_960),
}

EXPECTED_INPUT = {
  'lenet5': (28, 28, 1),
  'vit_tiny': (28, 28, 1),
  'resnet20': (32, 32, 3),
  'micronet_c100': (32, 32, 3),
  'resnet50': (224, 224, 3),
  'efficientnet_b0': (224, 224, 3),
  'efficientnet_b1': (240, 240, 3),
  'efficientnet_b7': (600, 600, 3),
}


def _abstract_init(model, shape, batch=1):
  """(logits, variables) as ShapeDtypeStructs: traces init, allocates nothing."""
  x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
  return jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False), x)


@functools.cache
def _registered(name):
  """Abstract (logits, variables) of a registered model at its default shape, batch 2."""
  model = models.create(name, num_classes=EXPECTED[name][0])
  return _abstract_init(model, models.input_shape(name), batch=2)


def _count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _fake_variables(abstract, seed=0):
  """Concrete variables from numpy, skipping a (slow to compile) RNG init."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ('scale', 'var'):
      return jnp.ones(leaf.shape, leaf.dtype)
    if name in ('bias', 'mean'):
      return jnp.asarray(0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
    fan_in = math.prod(leaf.shape[:-1])
    return jnp.asarray(rng.standard_normal(leaf.shape) * math.sqrt(2 / fan_in), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _compile_fast(fn, *args):
  """jit-compiles ``fn`` for ``args`` with XLA:CPU's LLVM optimizations off."""
  return jax.jit(fn).lower(*args).compile({'xla_backend_optimization_level': 0})


def _keys(tree):
  return set(tree.keys())


# -- registry -----------------------------------------------------------------


def test_registry_lists_every_expected_model():
  assert set(models.names()) == set(EXPECTED)


def test_register_adds_a_model(monkeypatch):
  monkeypatch.setattr(models, '_registry', dict(models._registry))  # Undone after the test.
  models.register(
    'resnet8', functools.partial(models.CifarResNet, depth=8), input_shape=[32, 32, 3]
  )
  assert models.names()[-1] == 'resnet8'
  assert models.input_shape('resnet8') == (32, 32, 3)
  model = models.create('resnet8', num_classes=3, dtype=jnp.bfloat16)
  assert (model.depth, model.num_classes, model.dtype) == (8, 3, jnp.bfloat16)
  logits, _ = _abstract_init(model, (32, 32, 3))
  assert logits.shape == (1, 3)
  with pytest.raises(ValueError, match="'resnet8' is already registered"):
    models.register('resnet8', models.CifarResNet)
  models.register('resnet8', models.CifarResNet, replace=True)
  assert models.create('resnet8', num_classes=10).depth == 20
  with pytest.raises(ValueError, match='without an input shape'):
    models.input_shape('resnet8')
  with pytest.raises(ValueError, match='input_shape'):
    models.register('tiny', models.LeNet5, input_shape=(28, 28))
  with pytest.raises(TypeError, match='callable'):
    models.register('tiny', 'LeNet5')
  assert 'tiny' not in models.names()


def test_scaling_command_line_runs_without_import_warning():
  # runpy warns if importing the package `ec2t_jax.models` already imported `scaling`.
  root = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run(
    [sys.executable, '-m', 'ec2t_jax.models.scaling', '--help'],
    cwd=root,
    capture_output=True,
    text=True,
    check=True,
  )
  assert 'usage: python -m ec2t_jax.models.scaling' in result.stdout
  assert 'RuntimeWarning' not in result.stderr, result.stderr
  assert models.scaling.candidates  # The package attribute imports it on first access.


def test_unknown_name_raises_listing_valid_names():
  with pytest.raises(ValueError, match='resnet20') as err:
    models.create('resnet21', num_classes=10)
  assert 'efficientnet_b7' in str(err.value) and 'resnet21' in str(err.value)
  with pytest.raises(ValueError, match='lenet5'):
    models.input_shape('vgg16')


@pytest.mark.parametrize('name', sorted(EXPECTED_INPUT))
def test_input_shape(name):
  assert models.input_shape(name) == EXPECTED_INPUT[name]


# -- parameter counts and output shapes (abstract) ----------------------------


@pytest.mark.parametrize('name', list(EXPECTED))
def test_param_count_and_output_shape(name):
  num_classes, expected = EXPECTED[name]
  logits, variables = _registered(name)
  assert logits.shape == (2, num_classes)
  assert logits.dtype == jnp.float32
  assert _count(variables['params']) == expected
  if name not in ('lenet5', 'vit_tiny'):  # The two without BatchNorm.
    assert set(variables) == {'params', 'batch_stats'}
    leaves = jax.tree_util.tree_leaves_with_path(variables['batch_stats'])
    assert {path[-1].key for path, _ in leaves} == {'mean', 'var'}


@pytest.mark.parametrize(
  'name', ['lenet5', 'vit_tiny', 'resnet20', 'micronet', 'resnet18', 'efficientnet_b0']
)
def test_bfloat16_logits_float32_params(name):
  model = models.create(name, num_classes=10, dtype=jnp.bfloat16)
  logits, variables = _abstract_init(model, models.input_shape(name))
  assert logits.dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


# -- the parameter-name contract with the PyTorch converter --------------------


def test_lenet5_param_names():
  _, v = _registered('lenet5')
  p = v['params']
  assert _keys(p) == {'conv1', 'conv2', 'fc1', 'fc2', 'fc3'}
  assert p['conv1']['kernel'].shape == (5, 5, 1, 6)
  assert p['conv2']['kernel'].shape == (5, 5, 6, 16)
  assert p['fc1']['kernel'].shape == (400, 120)
  assert all(_keys(layer) == {'kernel', 'bias'} for layer in p.values())


def test_cifar_resnet_param_names():
  _, v = _registered('resnet20')
  p = v['params']
  blocks = {f'layer{i}_{j}' for i in (1, 2, 3) for j in range(3)}
  assert _keys(p) == {'conv1', 'bn1', 'linear'} | blocks
  for b in blocks:  # Option A: no shortcut parameters, even at stride 2.
    assert _keys(p[b]) == {'conv1', 'bn1', 'conv2', 'bn2'}
    assert _keys(p[b]['conv1']) == {'kernel'}
  assert p['layer2_0']['conv1']['kernel'].shape == (3, 3, 16, 32)
  assert _keys(p['bn1']) == {'scale', 'bias'}
  assert _keys(v['batch_stats']['layer3_2']['bn2']) == {'mean', 'var'}
  assert _keys(p['linear']) == {'kernel', 'bias'}


def test_micronet_param_names_and_scaling():
  model = models.create('micronet_c100', num_classes=100)
  assert model.blocks_per_stage == 23
  assert model.widths == (32, 64, 120)
  _, v = _registered('micronet_c100')
  p = v['params']
  assert len(p) == 3 + 3 * 23
  assert p['conv1']['kernel'].shape == (3, 3, 3, 32)
  identity = {'bn1', 'conv1', 'bn2', 'conv2', 'bn3'}
  assert _keys(p['layer1_0']) == identity
  assert _keys(p['layer2_0']) == identity | {'shortcut_conv', 'shortcut_bn'}
  assert _keys(p['layer3_22']) == identity
  assert p['layer3_0']['shortcut_conv']['kernel'].shape == (1, 1, 64, 120)
  assert p['layer3_0']['bn1']['scale'].shape == (64,)
  # 3 stages x 23 blocks x 2 convs = 138 ternary 3x3 convs (docs/algorithm.md §8).
  n3x3 = sum(
    1
    for path, leaf in jax.tree_util.tree_leaves_with_path(p)
    if path[0].key.startswith('layer') and leaf.shape[:2] == (3, 3)
  )
  assert n3x3 == 138


def test_micronet_scaled_and_default():
  small = models.create('micronet', num_classes=10)
  assert small.blocks_per_stage == 7 and small.widths == (16, 32, 64)
  same = models.micronet_scaled(1.0, 1.0, 3.5, num_classes=10)
  assert (same.depth_mult, same.width_mult) == (1.0, 1.0)
  big = models.micronet_scaled(1.4, 1.2, 3.5, num_classes=10, dropout_rate=0.1)
  assert big.depth_mult == pytest.approx(1.4**3.5) and big.dropout_rate == 0.1
  assert models.create('micronet', num_classes=10, depth_mult=2.0).blocks_per_stage == 14
  with pytest.raises(ValueError, match='d=0'):
    models.micronet_scaled(0, 1.2, 1.0, num_classes=10)


def test_imagenet_resnet_param_names():
  _, v = _registered('resnet18')
  p = v['params']
  blocks = {f'layer{i}_{j}' for i in (1, 2, 3, 4) for j in (0, 1)}
  assert _keys(p) == {'conv1', 'bn1', 'fc'} | blocks
  assert p['conv1']['kernel'].shape == (7, 7, 3, 64)
  assert _keys(p['layer1_0']) == {'conv1', 'bn1', 'conv2', 'bn2'}
  assert _keys(p['layer2_0']) == {
    'conv1',
    'bn1',
    'conv2',
    'bn2',
    'downsample_conv',
    'downsample_bn',
  }
  assert p['layer2_0']['downsample_conv']['kernel'].shape == (1, 1, 64, 128)

  _, v = _registered('resnet50')
  p = v['params']
  bottleneck = {'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3'}
  assert _keys(p['layer1_0']) == bottleneck | {'downsample_conv', 'downsample_bn'}
  assert _keys(p['layer1_1']) == bottleneck
  assert p['layer3_0']['conv2']['kernel'].shape == (3, 3, 256, 256)  # Stride on the 3x3.
  assert p['fc']['kernel'].shape == (2048, 1000)


def test_efficientnet_param_names():
  _, v = _registered('efficientnet_b0')
  p = v['params']
  blocks = {f'blocks_{k}' for k in range(16)}
  assert _keys(p) == {'conv_stem', 'bn0', 'conv_head', 'bn1', 'fc'} | blocks
  assert _keys(p['blocks_0']) == {
    'depthwise_conv',
    'bn1',
    'se_reduce',
    'se_expand',
    'project_conv',
    'bn2',
  }
  assert _keys(p['blocks_1']) == _keys(p['blocks_0']) | {'expand_conv', 'bn0'}
  assert _keys(p['blocks_1']['se_reduce']) == {'kernel', 'bias'}
  assert _keys(p['blocks_1']['expand_conv']) == {'kernel'}
  # blocks_1: 16 -> 96 expanded, SE squeeze = int(16 * 0.25) = 4 (of the block input).
  assert p['blocks_1']['depthwise_conv']['kernel'].shape == (3, 3, 1, 96)
  assert p['blocks_1']['se_reduce']['kernel'].shape == (1, 1, 96, 4)
  assert p['blocks_1']['se_expand']['kernel'].shape == (1, 1, 4, 96)
  assert p['conv_head']['kernel'].shape == (1, 1, 320, 1280)

  _, v = _registered('efficientnet_b1')
  assert len([k for k in v['params'] if k.startswith('blocks_')]) == 23


@pytest.mark.parametrize('same_padding', [True, False])
def test_efficientnet_padding_modes_at_odd_resolution(same_padding):
  model = models.create('efficientnet_b0', num_classes=7, same_padding=same_padding)
  logits, v = _abstract_init(model, (65, 65, 3))
  assert logits.shape == (1, 7)
  assert _count(v['params']) == 5_288_548 - 1281 * 1000 + 1281 * 7


# -- helpers -------------------------------------------------------------------


def test_round_filters_and_repeats():
  w = 1.2**3.5
  assert [layers.round_filters(f, w) for f in (16, 32, 64)] == [32, 64, 120]
  assert layers.round_filters(32, 1.0) == 32
  assert layers.round_filters(1280, 1.1) == 1408
  assert layers.round_filters(4, 0.5) == 8  # min_depth.
  assert layers.round_filters(40, 1.1) == 48  # 44 rounds to 48 (half up).
  assert layers.round_filters(112, 1.15) == 128  # 128.8 -> 128.
  assert layers.round_filters(100, 0.86) == 88  # 86 -> 88.
  assert layers.round_filters(12, 1.4) == 16  # 16.8 -> 16.
  assert layers.round_filters(20, 0.88) == 16  # 17.6 -> 16, not below 0.9·17.6.
  assert layers.round_repeats(7, 1.4**3.5) == 23
  assert layers.round_repeats(3, 1.1) == 4
  assert layers.round_repeats(1, 3.1) == 4
  with pytest.raises(ValueError, match='width_mult'):
    layers.round_filters(16, 0.0)
  with pytest.raises(ValueError, match='depth_mult'):
    layers.round_repeats(7, -1.0)


def test_round_filters_bumps_when_rounding_loses_ten_percent():
  # 10 · 1.0 = 10: int(14)//8·8 = 8 < 9 = 0.9·10, so 8 + 8 = 16.
  assert layers.round_filters(10, 1.0) == 16
  # 11: int(15)//8·8 = 8 < 9.9, so 16.
  assert layers.round_filters(11, 1.0) == 16


@pytest.mark.parametrize(
  'size, kernel, strides, expected',
  [
    (224, 3, 2, (0, 1)),
    (225, 3, 2, (1, 1)),
    (112, 3, 1, (1, 1)),
    (14, 5, 2, (1, 2)),
    (7, 5, 1, (2, 2)),
  ],
)
def test_tf_same_padding(size, kernel, strides, expected):
  assert efficientnet.tf_same_padding(size, kernel, strides) == expected


def test_batchnorm_axis_name_is_wired():
  model = models.create('micronet', num_classes=10, depth_mult=0.1, axis_name='batch')
  _, v = _abstract_init(model.clone(axis_name=None), (32, 32, 3))

  def train_step(v, x):
    return model.apply(
      v, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)}
    )

  x = jax.ShapeDtypeStruct((2, 1, 32, 32, 3), jnp.float32)
  logits, _ = jax.eval_shape(jax.vmap(train_step, in_axes=(None, 0), axis_name='batch'), v, x)
  assert logits.shape == (2, 1, 10)
  with pytest.raises(NameError):  # Outside the mapped axis the cross-device mean cannot bind.
    jax.eval_shape(train_step, v, x.update(shape=(1, 32, 32, 3)))


# -- real forward passes -------------------------------------------------------


def test_efficientnet_stochastic_depth_drops_whole_residual_branches():
  def block(train):
    return efficientnet.MBConvBlock(
      input_filters=8,
      output_filters=8,
      kernel=3,
      strides=1,
      expand_ratio=1,
      conv=functools.partial(layers.Conv, use_bias=False, kernel_init=efficientnet.conv_init),
      norm=functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=0.99, epsilon=1e-3
      ),
      drop_connect_rate=0.5,
    )

  x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 4, 4, 8)), jnp.float32)
  _, abstract = _abstract_init(block(False), (4, 4, 8))
  variables = _fake_variables(abstract)

  def apply(variables, x, key, train):
    return block(train).apply(
      variables, x, train=train, rngs={'dropout': key}, mutable=['batch_stats']
    )[0]

  key = jax.random.key(0, impl='rbg')
  train = _compile_fast(functools.partial(apply, train=True), variables, x, key)
  y = np.asarray(train(variables, x, key))
  dropped = np.all(y == np.asarray(x), axis=(1, 2, 3))  # Branch dropped: identity only.
  assert 10 < dropped.sum() < 54  # About half of 64 examples, per example not per element.
  # Kept examples carry the branch scaled by 1/keep_prob; eval mode never drops.
  y_eval = np.asarray(jax.jit(functools.partial(apply, train=False))(variables, x, key))
  assert not np.any(np.all(y_eval == np.asarray(x), axis=(1, 2, 3)))


@pytest.mark.parametrize(
  'name, kwargs, shape',
  [
    ('lenet5', {}, (28, 28, 1)),
    ('lenet5', {'dtype': jnp.bfloat16}, (28, 28, 1)),
    ('resnet20', {}, (32, 32, 3)),
    ('micronet', {'depth_mult': 0.1, 'width_mult': 0.5}, (32, 32, 3)),
    ('efficientnet_b0', {}, (64, 64, 3)),
  ],
)
def test_forward_train_and_eval(name, kwargs, shape):
  model = models.create(name, num_classes=10, **kwargs)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, *shape)), jnp.float32)
  _, abstract = _abstract_init(model, shape)
  variables = _fake_variables(abstract)

  # 'rbg' keys and LLVM at -O0 make compiling several times faster on CPU; these
  # tests compile far more than they run, and the models do not depend on either.
  keys = [jax.random.key(seed, impl='rbg') for seed in (0, 1)]
  evaluate = _compile_fast(functools.partial(model.apply, train=False), variables, x)

  def train(variables, x, key):
    return model.apply(variables, x, train=True, rngs={'dropout': key}, mutable=['batch_stats'])

  train = _compile_fast(train, variables, x, keys[0])
  eval_logits = evaluate(variables, x)
  train0, updates = train(variables, x, keys[0])
  train1, _ = train(variables, x, keys[1])  # Same executable, another dropout key.
  dtype = kwargs.get('dtype', jnp.float32)
  for logits in (eval_logits, train0, train1):
    assert logits.shape == (4, 10) and logits.dtype == dtype
    assert np.all(np.isfinite(np.asarray(logits, np.float32)))
  if name == 'lenet5':
    np.testing.assert_array_equal(eval_logits, train0)
    return
  # Train mode uses batch statistics and updates the running averages.
  assert not np.allclose(eval_logits, train0)
  assert jax.tree.structure(updates['batch_stats']) == jax.tree.structure(variables['batch_stats'])
  old, new = (jax.tree.leaves(t) for t in (variables['batch_stats'], updates['batch_stats']))
  assert all(not np.allclose(a, b) for a, b in zip(old, new, strict=True))
  # Dropout / stochastic depth draw from the 'dropout' rng; ResNet-20 has none.
  if name == 'resnet20':
    np.testing.assert_array_equal(train0, train1)
  else:
    assert not np.allclose(train0, train1)
