"""Tests of the compression-method protocol and registry (`ec2t_jax.methods`)."""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ec2t_jax
from ec2t_jax import alias, baselines, methods, ternary, transforms, tree_util, twn

# The keys of config.ec2t every built-in method reads (their `settings`).
SETTINGS = {
  'gamma': 0.15,
  'init_scale': 0.3,
  'sustain': 0.05,
  'p0_min': 0.5,
  'centroid_floor_std': 0.675,
  'latent_learning_rate': 1e-3,
  'centroid_learning_rate': 1e-4,
  'learning_rate': 1e-3,
  'weight_decay': 5e-6,
  'reference_parity': False,
}
MASK = {'conv': True, 'dense': True, 'bias': False, 'step': False}


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    'conv': jnp.asarray(rng.standard_normal((3, 3, 4, 8)) * 0.1, jnp.float32),
    'dense': jnp.asarray(rng.standard_normal((32, 10)) * 0.1, jnp.float32),
    'bias': jnp.zeros((10,), jnp.float32),
    'step': jnp.zeros((), jnp.int32),
  }


def _grads(params, seed):
  rng = np.random.default_rng(100 + seed)

  def grad(p):
    if not jnp.issubdtype(p.dtype, jnp.floating):
      return jnp.zeros_like(p)
    return jnp.asarray(rng.standard_normal(p.shape) * 0.1, p.dtype)

  return jax.tree.map(grad, params)


@pytest.fixture
def registry():
  """Restores the registry after a test that registers or removes methods."""
  before = {name: methods.get(name) for name in methods.names()}
  yield
  for name in methods.names():
    if name not in before:
      methods.unregister(name)
  for name, method in before.items():
    methods.register(name, method, replace=True)


# --- the registry -------------------------------------------------------------------------------


def test_builtin_methods_in_order():
  assert methods.names()[:3] == ('ec2t', 'absmean', 'twn')
  assert methods.get('ec2t') is alias.EC2T and methods.get('ec2t').can_prune
  assert methods.get('absmean') is baselines.ABSMEAN and not baselines.ABSMEAN.can_prune
  assert methods.get('twn') is twn.TWN and not twn.TWN.can_prune
  for name in methods.names():
    method = methods.get(name)
    assert isinstance(method, methods.CompressionMethod) and method.name == name


def test_unknown_name_lists_the_valid_ones():
  with pytest.raises(ValueError, match=r"^unknown compression method 'bitnet'; valid: 'ec2t', "):
    methods.get('bitnet')
  with pytest.raises(
    ValueError, match=r"unknown config.method 'x'; valid: 'ec2t', 'absmean', 'twn'"
  ):
    methods.get('x', what='config.method')
  with pytest.raises(ValueError, match=r'unknown compression method None'):
    methods.get(None)


def test_register_replace_and_unregister(registry):
  variant = twn.TWN._replace(name='whatever')
  methods.register('twn2', variant)
  assert methods.names()[-1] == 'twn2' and methods.get('twn2').name == 'twn2'
  with pytest.raises(ValueError, match=r"method 'twn2' is already registered .* replace=True"):
    methods.register('twn2', baselines.ABSMEAN)
  methods.register('twn2', baselines.ABSMEAN, replace=True)
  assert methods.get('twn2').kernels is baselines.ABSMEAN.kernels
  assert methods.unregister('twn2').name == 'twn2'
  assert 'twn2' not in methods.names()
  with pytest.raises(ValueError, match=r"unknown compression method 'twn2'; valid: 'ec2t'"):
    methods.unregister('twn2')
  with pytest.raises(ValueError, match=r"must be a non-empty string, got ''"):
    methods.register('', twn.TWN)
  with pytest.raises(TypeError, match=r'needs an ec2t_jax.methods.CompressionMethod, got dict'):
    methods.register('x', {})
  # A built-in can be replaced, and is restored by the fixture.
  methods.register('ec2t', alias.EC2T._replace(can_prune=False), replace=True)
  assert not methods.get('ec2t').can_prune


def test_every_method_builds_an_optimizer_that_runs_a_step():
  for name in methods.names():
    method = methods.get(name)
    assert set(method.settings) <= set(SETTINGS)
    params = _params()
    tx = method.optimizer(SETTINGS, MASK, fixed_mask=None, freeze_at=100)
    state = tx.init(params)
    params = ec2t_jax.ternarize(params, state)
    assert [m.name for m, _ in methods.method_states(state)] == [name]
    update = jax.jit(tx.update)
    for i in range(2):
      updates, state = update(_grads(params, i), state, params)
      params = optax.apply_updates(params, updates)
    kernels = ec2t_jax.compressed_kernels(state, params)
    assert set(kernels) == {'conv', 'dense'}, name
    for k, v in kernels.items():
      np.testing.assert_array_equal(params[k], v)
      assert tree_util.ternary_levels(np.asarray(params[k])) is not None, (name, k)
    assert int(params['step']) == 0
    stats = ec2t_jax.summarize(state, params)
    assert stats['num_compressed'] == 3 * 3 * 4 * 8 + 32 * 10
    assert 0.0 < stats['total_sparsity'] < 1.0, name


def test_every_method_holds_fixed_leaves():
  for name in methods.names():
    params = _params()
    fixed = {'conv': False, 'dense': False, 'bias': True, 'step': False}
    tx = methods.get(name).optimizer(SETTINGS, {**MASK, 'dense': False}, fixed_mask=fixed)
    state = tx.init(params)
    updates, _ = tx.update(_grads(params, 0), state, ec2t_jax.ternarize(params, state))
    np.testing.assert_array_equal(updates['bias'], 0.0)
    np.testing.assert_array_equal(updates['dense'] != 0, True)


def test_settings_may_be_a_dataclass():
  fields = [(k, type(v)) for k, v in SETTINGS.items()] + [('prune_pattern', str)]
  settings_cls = dataclasses.make_dataclass('Settings', fields, frozen=True)
  settings = settings_cls(**SETTINGS, prune_pattern='')
  params = _params()
  for name in methods.names():
    state = methods.get(name).optimizer(settings, MASK).init(params)
    assert sorted(ec2t_jax.compressed_kernels(state, params)) == ['conv', 'dense']
  assert methods.get_setting(settings, 'gamma') == 0.15
  assert methods.get_setting(settings, 'nope', 7) == 7
  with pytest.raises(ValueError, match=r"the 'twn' method needs the settings 'learning_rate'"):
    twn.TWN.optimizer(dataclasses.make_dataclass('S', [('latent_learning_rate', float)])(1.0), MASK)


def test_settings_are_read_and_missing_ones_named():
  with pytest.raises(ValueError, match=r"the 'ec2t' method needs the settings 'gamma'; it reads "):
    alias.EC2T.optimizer({k: v for k, v in SETTINGS.items() if k != 'gamma'}, MASK)
  assert methods.read_settings({'a': 1, 'b': 2}, ('a',), 'm') == {'a': 1}


# --- pruning ------------------------------------------------------------------------------------


def test_only_pruning_methods_take_a_prune_mask():
  params = _params()
  prune = {'conv': False, 'dense': True, 'bias': False, 'step': False}
  tern = {**MASK, 'dense': False}
  state = alias.EC2T.optimizer(SETTINGS, tern, prune_mask=prune).init(params)
  kinds = {type(s).__name__ for s in ec2t_jax.compression_states(state)}
  assert kinds == {'TernaryTrainingState', 'EntropyConstrainedPruningState'}
  for name in ('absmean', 'twn'):
    with pytest.raises(
      ValueError,
      match=rf"^config.method='{name}' ternarizes only; it cannot prune \(prune_pattern='dense'\)"
      r": use config.method='ec2t' or prune_pattern=''$",
    ):
      methods.get(name).optimizer({**SETTINGS, 'prune_pattern': 'dense'}, tern, prune_mask=prune)
    with pytest.raises(ValueError, match=r'cannot prune \(a prune_mask\)'):
      methods.get(name).optimizer(SETTINGS, tern, prune_mask=prune)


def test_check_pruning_messages():
  assert methods.check_pruning('ec2t', prune_pattern='fc', ecp_stage=True) is alias.EC2T
  assert methods.check_pruning('absmean', prune_pattern='') is baselines.ABSMEAN
  with pytest.raises(ValueError, match=r"config.method='twn' ternarizes only; it cannot prune"):
    methods.check_pruning('twn', prune_pattern='fc1/kernel')
  with pytest.raises(
    ValueError,
    match=r"^an ecp stage prunes with EC2T's entropy constraint; config.method='absmean' has no "
    r"such stage: use kinds 'fp', 'ec2t' and 'frozen', or config.method='ec2t'$",
  ):
    methods.check_pruning('absmean', ecp_stage=True)
  with pytest.raises(ValueError, match=r"unknown config.method 'nope'; valid: 'ec2t'"):
    methods.check_pruning('nope')


# --- state_utils reads every method through the protocol ---------------------------------------


def _old_statistics(opt_state, params):
  """`ec2t_jax.statistics` as it was before the protocol: a switch on the state types."""
  dtypes = tree_util.leaf_dtypes(params)
  out, zeros, total, weighted = {}, jnp.zeros((), jnp.float32), 0, jnp.zeros((), jnp.float32)
  for state in baselines.states(opt_state):
    for name, w in tree_util.flat_dict(state.latent, skip_masked=True).items():
      a = baselines.absmean_assignment(w, state.quantizer_eps, dtypes[name])
      cnt = ternary.counts(a)
      bits = ternary.entropy_bits(cnt / a.size)
      out[f'{name}/sparsity'] = cnt[ternary.ZERO] / a.size
      out[f'{name}/w_p'] = out[f'{name}/w_n'] = baselines.absmean_scale(w, dtypes[name])
      out[f'{name}/entropy_bits'] = bits
      zeros, weighted, total = zeros + cnt[ternary.ZERO], weighted + bits * a.size, total + a.size
  leaves = jax.tree.leaves(opt_state, is_leaf=transforms.is_compression_state)
  for state in [x for x in leaves if transforms.is_compression_state(x)]:
    centroids = tree_util.flat_dict(state.centroids, skip_masked=True)
    lam = tree_util.flat_dict(state.lam, skip_masked=True)
    for name, a in tree_util.flat_dict(state.assignment, skip_masked=True).items():
      cnt = ternary.counts(a)
      pmf = cnt / a.size
      bits = ternary.entropy_bits(pmf)
      out[f'{name}/sparsity'] = pmf[ternary.ZERO]
      out[f'{name}/w_p'] = centroids[name][0]
      out[f'{name}/w_n'] = centroids[name][1]
      out[f'{name}/lambda'] = lam[name]
      out[f'{name}/entropy_bits'] = bits
      zeros, weighted, total = zeros + cnt[ternary.ZERO], weighted + bits * a.size, total + a.size
  out['total_sparsity'] = zeros / max(total, 1)
  out['num_compressed'] = jnp.asarray(total, jnp.float32)
  out['entropy_bits'] = weighted / max(total, 1)
  return out


def _old_kernels(opt_state, params):
  """`ec2t_jax.compressed_kernels` as it was before the protocol."""
  dtypes = tree_util.leaf_dtypes(params)
  out = {}
  for state in baselines.states(opt_state):
    for name, w in tree_util.flat_dict(state.latent, skip_masked=True).items():
      out[name] = baselines.absmean_quantize(w, state.quantizer_eps, dtypes[name])
  leaves = jax.tree.leaves(opt_state, is_leaf=transforms.is_compression_state)
  for state in [x for x in leaves if transforms.is_compression_state(x)]:
    prune = isinstance(state, transforms.EntropyConstrainedPruningState)
    latent = tree_util.flat_dict(state.latent, skip_masked=True)
    centroids = tree_util.flat_dict(state.centroids, skip_masked=True)
    for name, a in tree_util.flat_dict(state.assignment, skip_masked=True).items():
      if prune:
        out[name] = ternary.pruned_kernel(a, latent[name], dtypes[name])
      else:
        out[name] = ternary.ternary_kernel(a, centroids[name], dtypes[name])
  return out


@pytest.mark.parametrize('name', ['ec2t', 'absmean'])
def test_state_utils_give_the_results_of_before(name):
  params = _params()
  params['half'] = jnp.asarray(_params(3)['dense'], jnp.bfloat16)
  params['fc'] = jnp.asarray(_params(4)['dense'][:16], jnp.float32)
  tern = {**MASK, 'half': True, 'fc': False}
  prune = {k: k == 'fc' for k in params} if name == 'ec2t' else None
  tx = methods.get(name).optimizer(SETTINGS, tern, prune_mask=prune)
  state = tx.init(params)
  params = ec2t_jax.ternarize(params, state)
  for i in range(3):
    updates, state = jax.jit(tx.update)(_grads(params, i), state, params)
    params = optax.apply_updates(params, updates)
    # Under jit (as the trainer computes them) bit for bit.
    new = jax.jit(ec2t_jax.statistics)(state, params)
    old = jax.jit(_old_statistics)(state, params)
    assert list(new) == list(old)
    for k in old:
      np.testing.assert_array_equal(new[k], old[k], err_msg=k)
    # Eagerly too, but for absmean's sparsity: it was `count / size` of one element, and is
    # now EC2T's `(counts / size)[1]`, which XLA:CPU may round 1 ulp differently outside jit.
    new, old = ec2t_jax.statistics(state, params), _old_statistics(state, params)
    for k in old:
      if name == 'absmean' and k.endswith('sparsity'):
        np.testing.assert_array_max_ulp(new[k], old[k], maxulp=1)
      else:
        np.testing.assert_array_equal(new[k], old[k], err_msg=k)
    new, old = ec2t_jax.compressed_kernels(state, params), _old_kernels(state, params)
    assert sorted(new) == sorted(old)
    for k in old:
      assert new[k].dtype == old[k].dtype
      np.testing.assert_array_equal(new[k], old[k], err_msg=k)
  if name == 'ec2t':
    assert ec2t_jax.summarize(state, params) == {
      k: float(v) for k, v in _old_statistics(state, params).items()
    }


def test_states_of_several_methods_in_one_optimizer_state():
  params = _params()
  tx = optax.partition(
    {
      'a': baselines.absmean_ternary_training(),
      't': twn.twn_ternary_training(),
      'e': transforms.ternary_training(),
      'z': optax.set_to_zero(),
    },
    {'conv': 'a', 'dense': 't', 'bias': 'e', 'step': 'z'},
  )
  state = tx.init(params)
  found = {m.name: type(s) for m, s in methods.method_states(state)}
  assert found == {
    'absmean': baselines.AbsmeanTernaryTrainingState,
    'twn': twn.TwnTrainingState,
    'ec2t': transforms.TernaryTrainingState,
  }
  assert len(ec2t_jax.compression_states(state)) == 3
  params = ec2t_jax.ternarize(params, state)
  assert sorted(ec2t_jax.compressed_kernels(state, params)) == ['bias', 'conv', 'dense']
  stats = ec2t_jax.summarize(state, params)
  assert 'bias/lambda' in stats and 'conv/lambda' not in stats and 'dense/lambda' not in stats
  assert stats['dense/w_p'] == float(
    twn.twn_scale(state.inner_states['t'].inner_state.latent['dense'])
  )


def test_layers_view_of_each_method():
  params = _params()
  for name in methods.names():
    method = methods.get(name)
    state = method.optimizer(SETTINGS, MASK).init(params)
    ((m, s),) = methods.method_states(state)
    layers = m.layers(s, lambda n: tree_util.leaf_dtypes(params)[n])
    assert sorted(layers) == ['conv', 'dense']
    for n, layer in layers.items():
      assert layer.assignment.dtype == jnp.int8 and layer.assignment.shape == params[n].shape
      assert layer.latent.shape == params[n].shape
      assert (layer.lam is None) == (name != 'ec2t')
      q = np.asarray(ec2t_jax.compressed_kernels(state, params)[n])
      np.testing.assert_array_equal(np.asarray(layer.assignment) == 1, q == 0)
      np.testing.assert_array_equal(q[np.asarray(layer.assignment) == 2], float(layer.w_p))
      np.testing.assert_array_equal(q[np.asarray(layer.assignment) == 0], -float(layer.w_n))


# --- a new method is one module ----------------------------------------------------------------


class _SignState(NamedTuple):
  latent: Any
  latent_opt_state: optax.OptState


def _sign_quantize(state, w, dtype):
  """A toy method: `m·sign(W)` with `m = max|W|`, snapped like the built-in levels."""
  del state
  m = ternary.snap_centroids(jnp.stack([jnp.max(jnp.abs(w))] * 2), dtype)[0]
  q = jnp.sign(w) * m
  return jnp.where(q == 0, 0.0, q).astype(dtype)


def _sign_scale(state, w, dtype):
  """The level `m` of `_sign_quantize`, float32."""
  del state
  return ternary.snap_centroids(jnp.stack([jnp.max(jnp.abs(w))] * 2), dtype)[0]


def _sign_ternary(ternary_mask, *, latent_optimizer, fp_optimizer, fixed_mask):
  training = baselines.straight_through_training(
    'sign', _sign_quantize, _SignState, latent_optimizer
  )
  return alias.compression_partition(ternary_mask, training, fp_optimizer, fixed_mask=fixed_mask)


def test_a_registered_method_works_with_ternarize_and_statistics(registry):
  method = baselines.latent_method(
    'sign',
    _sign_ternary,
    lambda x: isinstance(x, _SignState),
    _sign_quantize,
    _sign_scale,
  )
  methods.register('sign', method)
  params = _params()
  tx = methods.get('sign').optimizer(SETTINGS, MASK)
  state = tx.init(params)
  params = ec2t_jax.ternarize(params, state)
  updates, state = tx.update(_grads(params, 0), state, params)
  params = optax.apply_updates(params, updates)
  stats = ec2t_jax.summarize(state, params)
  assert stats['total_sparsity'] == 0.0
  assert stats['dense/w_p'] == float(np.max(np.abs(params['dense'])))
  assert ec2t_jax.compression_states(state)[0].__class__ is _SignState


def test_compression_partition_needs_prune_mask_and_prune_tx_together():
  with pytest.raises(ValueError, match=r'needs prune_mask and prune_tx together'):
    alias.compression_partition(MASK, optax.sgd(1.0), optax.sgd(1.0), prune_mask=MASK)


def test_public_api():
  assert ec2t_jax.methods is methods
  for name in methods.__all__:
    obj = getattr(methods, name)
    assert getattr(obj, '__doc__', None) or name == 'DtypeOf', name
