"""Tests of `ec2t_jax.masks` on users' own models: jit-built params, embeddings, Flax NNX."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import ec2t_jax
from ec2t_jax import masks, models, tree_util


def _selected(mask):
  return sorted(name for name, flag in tree_util.named_leaves(mask) if flag)


class _MLP(nn.Module):
  """Alphabetical order (body, classifier, mlp) differs from call order (body, mlp, classifier)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64, name='body')(x))
    x = nn.relu(nn.Dense(64, name='mlp')(x))
    return nn.Dense(10, name='classifier')(x)


class _Transformer(nn.Module):
  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(100, 32, name='embed')(ids)
    for i in range(2):
      h = h + nn.MultiHeadDotProductAttention(num_heads=4, name=f'attn{i}')(
        nn.LayerNorm(name=f'ln{i}')(h)
      )
      h = h + nn.Dense(32, name=f'mlp_out{i}')(nn.gelu(nn.Dense(128, name=f'mlp_in{i}')(h)))
    return nn.Dense(5, name='head')(h.mean(1))


def test_mlp_same_selection_from_init_jit_and_eval_shape():
  model, x = _MLP(), jnp.ones((1, 784))
  plain = model.init(jax.random.key(0), x)['params']
  jitted = jax.jit(model.init)(jax.random.key(0), x)['params']
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)['params']
  assert list(jitted) == ['body', 'classifier', 'mlp']  # Sorted: the creation order is gone.
  for params in (plain, jitted, abstract):
    assert _selected(masks.default_ternary_mask(params)) == ['mlp/kernel']
  by_call = masks.default_ternary_mask(jitted, order=masks.call_order(model, x))
  assert _selected(by_call) == ['mlp/kernel']


def test_jitted_tx_init_uses_the_same_layers():
  model, x = _MLP(), jnp.ones((1, 784))
  params = jax.jit(model.init)(jax.random.key(0), x)['params']
  tx = ec2t_jax.ec2t(ec2t_jax.default_ternary_mask)
  state = jax.jit(tx.init)(params)
  assert sorted(ec2t_jax.compressed_kernels(state, params)) == ['mlp/kernel']


def test_transformer_embedding_counts_as_first_layer():
  model, ids = _Transformer(), jnp.zeros((1, 8), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), ids)['params']
  chosen = _selected(masks.default_ternary_mask(params))
  assert 'head/kernel' not in chosen  # The last layer.
  assert 'embed/embedding' not in chosen  # Embeddings are never ternarized by default.
  assert 'attn0/query/kernel' in chosen and 'mlp_in0/kernel' in chosen
  assert all(name.endswith('kernel') for name in chosen)
  by_call = masks.default_ternary_mask(params, order=masks.call_order(model, ids))
  assert _selected(by_call) == chosen


@pytest.mark.parametrize('name', ['lenet5', 'resnet20', 'micronet', 'resnet18'])
def test_zoo_models_shapes_agree_with_call_order(name):
  model = models.create(name, num_classes=10)
  x = jax.ShapeDtypeStruct((1, *models.input_shape(name)), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)['params']
  by_call = masks.default_ternary_mask(params, order=masks.call_order(model, x, train=False))
  assert masks.default_ternary_mask(params) == by_call


def test_ambiguous_params_are_refused_with_what_to_pass():
  params = {'a': {'kernel': np.zeros((8, 8))}, 'b': {'kernel': np.zeros((8, 8))}}
  with pytest.raises(ValueError, match=r'cannot tell the first and last layer.*call_order'):
    masks.default_ternary_mask(params)


def test_creation_order_that_disagrees_with_shapes_is_refused():
  # Insertion order says 'z' is last; shapes say 'a' is (its 10 outputs feed nothing).
  params = {
    'stem': {'kernel': np.zeros((4, 8))},
    'a': {'kernel': np.zeros((8, 10))},
    'z': {'kernel': np.zeros((8, 8))},
  }
  with pytest.raises(ValueError, match='cannot tell'):
    masks.default_ternary_mask(params)


# --- Flax NNX ----------------------------------------------------------------------------------


class _NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(16, 32, rngs=rngs)
    self.fc2 = nnx.Linear(32, 32, rngs=rngs)
    self.fc3 = nnx.Linear(32, 4, rngs=rngs)

  def __call__(self, x):
    return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


def _nnx_step(model, optimizer, x, y):
  def loss(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

  optimizer.update(model, nnx.grad(loss)(model))


@pytest.mark.parametrize(
  'mask',
  [
    ec2t_jax.default_ternary_mask,
    lambda p: masks.from_regex(p, r'fc2/kernel'),
    lambda p: jax.tree_util.tree_map_with_path(
      lambda path, _: tree_util.path_str(path) == 'fc2/kernel', p
    ),
  ],
  ids=['default', 'regex', 'callable'],
)
def test_nnx_optimizer_trains_fc2_ternary(mask):
  model = _NnxMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ec2t_jax.ec2t(mask, gamma=0.1), wrt=nnx.Param)
  # The one-liner that puts the initial ternary kernels into the model.
  nnx.update(model, ec2t_jax.ternarize(nnx.state(model, nnx.Param), optimizer.opt_state))
  x = jax.random.normal(jax.random.key(1), (32, 16))
  y = jnp.arange(32) % 4
  before = np.asarray(model.fc1.kernel[...])
  for _ in range(3):
    _nnx_step(model, optimizer, x, y)
  assert len(np.unique(np.asarray(model.fc2.kernel[...]))) <= 3
  assert not np.array_equal(before, np.asarray(model.fc1.kernel[...]))  # Trained in fp.
  assert len(np.unique(np.asarray(model.fc1.kernel[...]))) > 3
  summary = ec2t_jax.summarize(optimizer.opt_state)
  assert 'fc2/kernel/sparsity' in summary and 0.0 <= summary['total_sparsity'] <= 1.0


@pytest.mark.skipif(not hasattr(nnx, 'ModelAndOptimizer'), reason='older flax')
def test_nnx_model_and_optimizer():
  model = _NnxMLP(nnx.Rngs(0))
  state = nnx.ModelAndOptimizer(model, ec2t_jax.ec2t(ec2t_jax.default_ternary_mask), wrt=nnx.Param)
  x, y = jnp.ones((8, 16)), jnp.zeros((8,), jnp.int32)

  def loss(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

  state.update(nnx.grad(loss)(state.model))
  assert len(np.unique(np.asarray(state.model.fc2.kernel[...]))) <= 3
