"""Tests for ec2t_jax.models.vit: parameter count, shapes, dtypes, dropout, ternary selection."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ec2t_jax import masks, models, tree_util
from ec2t_jax.configs import mnist
from ec2t_jax.models import vit

# The lax primitives the float32 network traces to (ec2t_jax/models/vit.py): the
# contract with a jaxpr-to-ONNX translation.
PRIMITIVES = {
  'add',
  'broadcast_in_dim',
  'copy',
  'div',
  'dot_general',
  'erfc',
  'exp',
  'max',
  'mul',
  'neg',
  'reduce_max',
  'reduce_sum',
  'reshape',
  'rsqrt',
  'square',
  'stop_gradient',
  'sub',
  'transpose',
}


def _expected_params(shape, num_classes, patch_size=7, width=64, depth=4, mlp_ratio=2, num_heads=4):
  """The module docstring's formula, term by term (the number of heads does not count)."""
  del num_heads
  h, w, c = shape
  d, m = width, mlp_ratio * width
  tokens = (h // patch_size) * (w // patch_size)
  patch_embed = (patch_size * patch_size * c + 1) * d
  pos_embedding = tokens * d
  attention = 4 * (d * d + d)  # query, key, value, out.
  mlp = (d * m + m) + (m * d + d)  # fc1, fc2.
  norms = 2 * 2 * d  # norm1, norm2: scale and bias.
  final_norm = 2 * d
  head = (d + 1) * num_classes
  return patch_embed + pos_embedding + depth * (attention + mlp + norms) + final_norm + head


def _abstract(model, shape, batch=2):
  x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
  return jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False), x)


def _count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _images(shape, batch=4, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, *shape)), jnp.float32)


@functools.cache
def _mnist_vit():
  """(model, variables) of `vit_tiny` at 28x28x1, initialised for real."""
  model = models.create('vit_tiny', num_classes=10)
  return model, jax.jit(model.init)(jax.random.key(0), _images((28, 28, 1), batch=1))


@pytest.mark.parametrize(
  'shape, kwargs',
  [
    ((28, 28, 1), {}),
    ((32, 32, 3), {'patch_size': 4}),
    ((28, 28, 1), {'patch_size': 4, 'width': 96, 'depth': 2, 'num_heads': 3, 'mlp_ratio': 4}),
  ],
)
def test_param_count_matches_the_formula_and_logits_shape(shape, kwargs):
  model = models.create('vit_tiny', num_classes=10, **kwargs)
  logits, variables = _abstract(model, shape)
  assert set(variables) == {'params'}
  assert _count(variables) == _expected_params(shape, 10, **kwargs)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32


def test_registered_defaults():
  assert models.input_shape('vit_tiny') == (28, 28, 1)
  model = models.create('vit_tiny', num_classes=10)
  assert isinstance(model, vit.ViT)
  assert (model.patch_size, model.width, model.depth, model.num_heads) == (7, 64, 4, 4)
  assert _count(_abstract(model, (28, 28, 1))[1]) == 138_890


def test_param_names():
  _, variables = _mnist_vit()
  params = variables['params']
  assert set(params) == {'patch_embed', 'pos_embedding', 'norm', 'head'} | {
    f'blocks_{i}' for i in range(4)
  }
  block = params['blocks_0']
  assert set(block) == {'norm1', 'attn', 'norm2', 'mlp'}
  assert set(block['attn']) == {'query', 'key', 'value', 'out'}
  assert set(block['mlp']) == {'fc1', 'fc2'}
  assert block['attn']['query']['kernel'].shape == (64, 64)
  assert block['mlp']['fc1']['kernel'].shape == (64, 128)
  assert block['mlp']['fc2']['kernel'].shape == (128, 64)
  assert params['patch_embed']['kernel'].shape == (49, 64)
  assert params['pos_embedding'].shape == (1, 16, 64)
  assert params['head']['kernel'].shape == (64, 10)


@pytest.mark.parametrize('shape, patch_size', [((28, 28, 1), 7), ((32, 32, 3), 4)])
def test_forward_is_finite_and_batch_independent(shape, patch_size):
  model = models.create('vit_tiny', num_classes=10, patch_size=patch_size)
  x = _images(shape)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  apply = jax.jit(functools.partial(model.apply, train=False))
  logits = apply(variables, x)
  assert logits.shape == (4, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  # Examples do not interact (no BatchNorm, attention within an image only).
  np.testing.assert_allclose(apply(variables, x[:1]), logits[:1], rtol=1e-5, atol=1e-5)


def test_bfloat16_computation_float32_params():
  model, variables = _mnist_vit()
  x = _images((28, 28, 1))
  bf16 = models.create('vit_tiny', num_classes=10, dtype=jnp.bfloat16)
  _, abstract = _abstract(bf16, (28, 28, 1))
  assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
  logits = jax.jit(functools.partial(bf16.apply, train=False))(variables, x)
  assert logits.dtype == jnp.bfloat16
  reference = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  np.testing.assert_allclose(np.asarray(logits, np.float32), reference, atol=0.1, rtol=0.05)


def test_dropout_draws_from_the_dropout_rng_in_training_only():
  model = models.create('vit_tiny', num_classes=10, dropout_rate=0.5)
  _, variables = _mnist_vit()  # Dropout has no parameters: the same variables apply.
  x = _images((28, 28, 1))

  @jax.jit
  def train(key):
    return model.apply(variables, x, train=True, rngs={'dropout': key})

  a, b = train(jax.random.key(1)), train(jax.random.key(2))
  assert not np.allclose(a, b)
  evaluate = jax.jit(functools.partial(model.apply, train=False))
  no_dropout = models.create('vit_tiny', num_classes=10)
  reference = no_dropout.apply(variables, x)
  np.testing.assert_allclose(evaluate(variables, x), reference, rtol=1e-5, atol=1e-5)
  # Without dropout, training mode computes the evaluation function and needs no rng.
  np.testing.assert_array_equal(no_dropout.apply(variables, x, train=True), reference)


def _randomized(params, seed):
  """`params` with every leaf redrawn from N(0, 0.3²) (biases nonzero, unlike at init)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
    [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
  )


@pytest.mark.parametrize('num_heads, width, tokens', [(4, 32, 9), (1, 8, 5), (3, 24, 16)])
def test_self_attention_equals_flax_multi_head_attention(num_heads, width, tokens):
  attn = vit.SelfAttention(
    num_heads,
    dense=nn.Dense,
    dropout=functools.partial(nn.Dropout, rate=0.0, deterministic=True),
  )
  x = _images((tokens, width), batch=2, seed=3)
  params = _randomized(attn.init(jax.random.key(0), x)['params'], seed=1)
  h, c = num_heads, width // num_heads
  # The same weights in flax's per-head layout: (D, D) -> (D, H, D/H) for the
  # projections to the heads, (D, D) -> (H, D/H, D) for `out`; feature j of the
  # concatenated heads is head j // (D/H), channel j % (D/H).
  reference = {
    name: {
      'kernel': params[name]['kernel'].reshape(width, h, c),
      'bias': params[name]['bias'].reshape(h, c),
    }
    for name in ('query', 'key', 'value')
  }
  reference['out'] = {
    'kernel': params['out']['kernel'].reshape(h, c, width),
    'bias': params['out']['bias'],
  }
  mha = nn.MultiHeadDotProductAttention(
    num_heads=h, qkv_features=width, out_features=width, deterministic=True
  )
  expected_shapes = jax.tree.map(jnp.shape, mha.init(jax.random.key(0), x)['params'])
  assert jax.tree.map(jnp.shape, reference) == expected_shapes
  got = jax.jit(attn.apply)({'params': params}, x)
  want = jax.jit(mha.apply)({'params': reference}, x)
  assert got.shape == (2, tokens, width)
  # float32 attention (two matmuls, a softmax): ~1e-5 relative, whatever the CPU.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # A swapped softmax axis or mixed-up heads would be far off (guards the check itself).
  assert np.max(np.abs(np.asarray(got) - np.asarray(x))) > 1e-2


@pytest.mark.parametrize('shape, patch_size', [((28, 28, 1), 7), ((32, 32, 3), 4), ((8, 12, 2), 2)])
def test_patch_embed_is_the_documented_strided_convolution(shape, patch_size):
  model = models.create('vit_tiny', num_classes=10, patch_size=patch_size, width=16, depth=1)
  x = _images(shape, batch=2, seed=5)
  params = _randomized(jax.jit(model.init)(jax.random.key(0), x)['params'], seed=2)
  _, state = model.apply(
    {'params': params},
    x,
    capture_intermediates=lambda module, _: module.name == 'patch_embed',
    mutable=['intermediates'],
  )
  (tokens,) = state['intermediates']['patch_embed']['__call__']
  p, (h, w, ch) = patch_size, shape
  kernel = params['patch_embed']['kernel'].reshape(p, p, ch, 16)  # HWIO.
  conv = jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=(p, p),
    padding='VALID',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    precision=jax.lax.Precision.HIGHEST,
  )
  conv = conv + params['patch_embed']['bias']
  assert conv.shape == (2, h // p, w // p, 16)
  # Tokens in row-major patch order: token i·(W/p) + j is the patch at row i, column j.
  np.testing.assert_allclose(tokens, conv.reshape(2, -1, 16), rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_refused():
  model = models.create('vit_tiny', num_classes=10)
  with pytest.raises(ValueError, match=r'patch_size 7 .* got an image of 32x32'):
    _abstract(model, (32, 32, 3))
  with pytest.raises(ValueError, match=r'num_heads 5 must divide width 64; valid: \[1, 2, 4'):
    _abstract(models.create('vit_tiny', num_classes=10, num_heads=5), (28, 28, 1))
  for bad in (0, -4):
    with pytest.raises(ValueError, match=rf'num_heads {bad} must divide width 64; valid: \[1, 2'):
      _abstract(models.create('vit_tiny', num_classes=10, num_heads=bad), (28, 28, 1))
    attn = vit.SelfAttention(bad, dense=nn.Dense, dropout=nn.Dropout)
    with pytest.raises(ValueError, match=rf'num_heads {bad} must divide the token width 8; valid'):
      attn.init(jax.random.key(0), jnp.zeros((1, 3, 8)))
  # The position table has the size of the images it was initialised on.
  model, variables = _mnist_vit()
  with pytest.raises(Exception, match=r'pos_embedding.*\(1, 25, 64\).*\(1, 16, 64\)'):
    model.apply(variables, _images((35, 35, 1), batch=1))


def test_traces_to_plain_lax_primitives():
  model, variables = _mnist_vit()
  jaxpr = jax.make_jaxpr(functools.partial(model.apply, train=False))(
    variables, _images((28, 28, 1), batch=1)
  )
  found = set()

  def walk(j):
    for eqn in j.eqns:
      found.add(eqn.primitive.name)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  assert found <= PRIMITIVES, sorted(found - PRIMITIVES)
  assert 'dot_general' in found and 'erfc' in found


# -- which kernels are ternary --------------------------------------------------

TERNARY = {
  f'blocks_{i}/{layer}/kernel'
  for i in range(4)
  for layer in ('attn/query', 'attn/key', 'attn/value', 'attn/out', 'mlp/fc1', 'mlp/fc2')
}


def _selected(mask):
  return {name for name, chosen in tree_util.named_leaves(mask) if chosen}


def test_default_selection_is_the_attention_and_mlp_kernels():
  model, variables = _mnist_vit()
  params = variables['params']
  cfg = mnist.get_config('vit').ec2t
  order = masks.call_order(model, jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32), train=False)
  # As the trainer builds it (ec2t_jax/training/setup.py: compression_masks).
  mask = masks.default_ternary_mask(
    params,
    order=order,
    keep_first=cfg.keep_first,
    keep_last=cfg.keep_last,
    keep_pattern=cfg.keep_pattern or None,
  )
  assert _selected(mask) == TERNARY
  # Without the call order, the shapes alone give the same selection, also after jit
  # (which sorts the params' keys).
  assert _selected(masks.default_ternary_mask(params)) == TERNARY
  assert _selected(masks.default_ternary_mask(jax.jit(lambda p: p)(params))) == TERNARY


def test_selection_overrides_documented_in_the_module():
  model, variables = _mnist_vit()
  params = variables['params']
  mlp_only = masks.from_regex(params, r'blocks_\d+/mlp/fc\d/kernel$', 'blocks_0/')
  assert _selected(mlp_only) == {n for n in TERNARY if '/mlp/' in n and 'blocks_0' not in n}
  order = masks.call_order(model, jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32), train=False)
  kept = masks.default_ternary_mask(params, order=order, keep_pattern='(attn/out|blocks_3/)')
  assert _selected(kept) == {n for n in TERNARY if 'attn/out' not in n and 'blocks_3' not in n}


# -- the recipe -------------------------------------------------------------------


def test_recipe_variants():
  config = mnist.get_config('vit')
  assert config.model == 'vit_tiny' and config.dataset == 'mnist'
  assert config.ec2t.keep_first and config.ec2t.keep_last
  smoke = mnist.get_config('vit_smoke')
  assert smoke.model == 'vit_tiny' and smoke.steps_per_epoch == 2
  with pytest.raises(ValueError, match="'vit_big'.*valid: '', 'smoke', 'vit', 'vit_smoke'"):
    mnist.get_config('vit_big')


@pytest.mark.slow
def test_vit_smoke_trains_end_to_end(tmp_path):
  from ec2t_jax.training import train

  summary = train.train_and_evaluate(mnist.get_config('vit_smoke'), str(tmp_path / 'run'))
  assert summary['steps'] == 6  # 2 steps in each of the three stages.
  assert summary['num_params'] == 138_890
  assert set(summary['per_layer_sparsity']) == TERNARY
  assert np.isfinite(summary['test_accuracy'])
  assert 0.0 < summary['sparsity'] < 1.0
