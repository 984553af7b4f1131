"""Tests of the EC2T optax transformations and the `ec2t` alias."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as reference
import optax
import pytest
from conftest import counting_jit
from flax import linen as nn

import ec2t_jax
from ec2t_jax import fused, jaxprs, ternary, transforms, tree_util

SHAPES = {'conv': (3, 3, 4, 8), 'dense': (32, 10), 'small': (5, 3)}


def _weights(seed=0, shapes=SHAPES, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return {k: (rng.standard_normal(s) * 0.1).astype(dtype) for k, s in shapes.items()}


def _all_true(params):
  return jax.tree.map(lambda _: True, params)


def _state(opt_state):
  (state,) = ec2t_jax.compression_states(opt_state)
  return state


def _assert_exactly_ternary(params, opt_state):
  """Every compressed leaf holds, bit for bit, only the state's levels at the state's places."""
  expected = ec2t_jax.compressed_kernels(opt_state, params)
  flat = dict(tree_util.named_leaves(params))
  for name, q in expected.items():
    np.testing.assert_array_equal(np.asarray(flat[name]), np.asarray(q), err_msg=name)


@pytest.mark.parametrize('parity', [False, True])
def test_matches_numpy_reference_for_220_steps(parity):
  freeze = 150
  w0 = _weights()
  tx = ec2t_jax.ec2t(_all_true, reference_parity=parity, freeze_assignment_at=freeze)
  params = {k: jnp.asarray(v) for k, v in w0.items()}
  opt_state = tx.init(params)
  params = ec2t_jax.ternarize(params, opt_state)
  ref = reference.ReferenceEC2T(w0, parity=parity)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(1)
  for step in range(220):
    if step == freeze:
      ref.freeze()
    grads = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in SHAPES.items()}
    updates, opt_state = update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ref.step(grads)
    state = _state(opt_state)
    for k in SHAPES:
      np.testing.assert_array_equal(state.assignment[k], ref.a[k], err_msg=f'{k} step {step}')
  for k in SHAPES:
    np.testing.assert_allclose(state.latent[k], ref.latent[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.centroids[k], ref.c[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(params[k]), ref.kernels()[k], rtol=1e-5, atol=1e-6)
  _assert_exactly_ternary(params, opt_state)


def test_parity_and_correct_modes_differ():
  """The w_n sign matters: the two modes take different paths from the same start."""
  outs = []
  for parity in (False, True):
    tx = ec2t_jax.ec2t(_all_true, reference_parity=parity)
    params = {k: jnp.asarray(v) for k, v in _weights().items()}
    st = tx.init(params)
    g = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
    for _ in range(3):
      _, st = tx.update(g, st, params)
    outs.append(np.asarray(_state(st).centroid_latent['dense'][1]))
  assert outs[0] != outs[1]


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_params_stay_exactly_ternary_through_direct_switches(dtype):
  """Large steps make weights jump between +w_p and -w_n; params must stay exact."""
  tx = ec2t_jax.ec2t(
    _all_true,
    gamma=0.3,
    latent_optimizer=optax.sgd(20.0),
    centroid_optimizer=optax.sgd(0.05),
  )
  params = {k: jnp.asarray(v, dtype) for k, v in _weights(2).items()}
  opt_state = tx.init(params)
  params = ec2t_jax.ternarize(params, opt_state)
  _assert_exactly_ternary(params, opt_state)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(3)
  direct_switches = 0
  for _ in range(40):
    before = {k: np.asarray(a) for k, a in _state(opt_state).assignment.items()}
    grads = {k: jnp.asarray(rng.standard_normal(s) * 0.3, dtype) for k, s in SHAPES.items()}
    updates, opt_state = update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    after = _state(opt_state).assignment
    direct_switches += sum(
      int(np.sum((before[k] == 2) & (np.asarray(after[k]) == 0))) for k in SHAPES
    )
    _assert_exactly_ternary(params, opt_state)
    assert all(params[k].dtype == dtype for k in SHAPES)
  assert direct_switches > 0, 'the test did not exercise a +w_p → -w_n switch'


def test_ternarize_then_every_step_inside_one_jitted_train_step():
  """apply_updates inside the same jit as the update (as a real train step) stays exact."""
  tx = ec2t_jax.ec2t(_all_true, latent_optimizer=optax.sgd(0.3))
  params = {k: jnp.asarray(v) for k, v in _weights(4).items()}
  opt_state = tx.init(params)
  params = ec2t_jax.ternarize(params, opt_state)

  @jax.jit
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(5)
  for _ in range(20):
    grads = {k: jnp.asarray(rng.standard_normal(s) * 0.2, jnp.float32) for k, s in SHAPES.items()}
    params, opt_state = step(params, opt_state, grads)
    _assert_exactly_ternary(params, opt_state)


def test_pruned_leaves_hold_latent_values_or_exact_zeros():
  params = {
    'kernel': jnp.asarray(_weights()['dense']),
    'depthwise': jnp.asarray(_weights(7)['conv']),
  }
  tx = ec2t_jax.ec2t(
    {'kernel': True, 'depthwise': False},
    prune_mask={'kernel': False, 'depthwise': True},
    latent_optimizer=optax.sgd(0.2),
  )
  opt_state = tx.init(params)
  params = ec2t_jax.ternarize(params, opt_state)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(8)
  for _ in range(15):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape) * 0.1, p.dtype), params)
    updates, opt_state = update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    _assert_exactly_ternary(params, opt_state)
  (prune_state,) = [
    s
    for s in ec2t_jax.compression_states(opt_state)
    if isinstance(s, ec2t_jax.EntropyConstrainedPruningState)
  ]
  a = np.asarray(prune_state.assignment['depthwise'])
  d = np.asarray(params['depthwise'])
  np.testing.assert_array_equal(d[a == 1], 0.0)
  np.testing.assert_array_equal(d[a != 1], np.asarray(prune_state.latent['depthwise'])[a != 1])
  assert len(np.unique(d)) > 3  # full precision where kept


def test_frozen_phase_keeps_assignment_and_latent_but_trains_centroids():
  tx = ec2t_jax.ec2t(_all_true, freeze_assignment_at=3, centroid_optimizer=optax.adam(1e-2))
  params = {k: jnp.asarray(v) for k, v in _weights().items()}
  opt_state = tx.init(params)
  params = ec2t_jax.ternarize(params, opt_state)
  rng = np.random.default_rng(9)
  snaps = []
  for _ in range(8):
    grads = {k: jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32) for k, s in SHAPES.items()}
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    st = _state(opt_state)
    snaps.append(jax.tree.map(np.asarray, (st.assignment, st.latent, st.centroids)))
  for later in snaps[3:]:
    for k in SHAPES:
      np.testing.assert_array_equal(later[0][k], snaps[2][0][k])
      np.testing.assert_array_equal(later[1][k], snaps[2][1][k])
  assert any(not np.array_equal(snaps[-1][2][k], snaps[2][2][k]) for k in SHAPES)


def test_fp_params_get_coupled_l2_then_adam():
  params = {'w': jnp.asarray(_weights()['dense']), 'b': jnp.full((4,), 2.0)}
  tx = ec2t_jax.ec2t({'w': True, 'b': False})
  expected_tx = optax.chain(optax.add_decayed_weights(5e-6), optax.adam(1e-4))
  st, est = tx.init(params), expected_tx.init(params['b'])
  g = {'w': jnp.zeros((32, 10)), 'b': jnp.array([0.1, -0.2, 0.0, 1.0])}
  u, _ = tx.update(g, st, params)
  eu, _ = expected_tx.update(g['b'], est, params['b'])
  np.testing.assert_array_equal(u['b'], eu)


def test_reset_at_step_restarts_inner_state():
  tx = transforms.reset_at_step(optax.adam(1.0), 2)
  params = jnp.zeros(3)
  st = tx.init(params)
  updates = []
  for _ in range(4):
    u, st = tx.update(jnp.ones(3), st, params)
    updates.append(u)
  # Adam's first update is -lr·sign(g); after the reset at step 2 it is the first again.
  np.testing.assert_allclose(updates[2], updates[0], rtol=1e-6)
  assert int(st.inner_state[0].count) == 2


# --- the JAX contract ---------------------------------------------------------------------------

FACTORIES = {
  'ternary_training': lambda: transforms.ternary_training(gamma=0.2),
  'entropy_constrained_pruning': lambda: transforms.entropy_constrained_pruning(gamma=0.2),
  'ec2t': lambda: ec2t_jax.ec2t(_all_true, gamma=0.2, freeze_assignment_at=2),
  'reset_at_step': lambda: transforms.reset_at_step(transforms.ternary_training(), 1),
}


def _grads(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape) * 0.05, p.dtype), params)


@pytest.mark.parametrize('name', list(FACTORIES))
def test_contract_jit_compiles_once_and_preserves_dtype(name):
  tx = FACTORIES[name]()
  params = {k: jnp.asarray(v) for k, v in _weights().items()}
  params['half'] = jnp.asarray(_weights(3)['small'], jnp.bfloat16)
  update, traces = counting_jit(tx)
  state = tx.init(params)
  for i in range(3):
    updates, state = update(_grads(params, i), state, params)
    params = optax.apply_updates(params, updates)
  assert len(traces) == 1, f'{name} recompiled: the state changed type or shape'
  for k in params:
    assert updates[k].dtype == params[k].dtype
  assert params['half'].dtype == jnp.bfloat16


@pytest.mark.parametrize('name', ['ternary_training', 'entropy_constrained_pruning'])
def test_contract_inside_masked_and_partition(name):
  params = {k: jnp.asarray(v) for k, v in _weights().items()}
  mask = {'conv': True, 'dense': True, 'small': False}
  tx = optax.masked(FACTORIES[name](), mask)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(_grads(params, 0), state, params)
  np.testing.assert_array_equal(updates['small'], _grads(params, 0)['small'])
  labels = {'conv': 'a', 'dense': 'a', 'small': 'b'}
  tx2 = optax.partition({'a': FACTORIES[name](), 'b': optax.sgd(0.1)}, labels)
  state2 = tx2.init(params)
  updates2, _ = jax.jit(tx2.update)(_grads(params, 0), state2, params)
  np.testing.assert_array_equal(updates2['conv'], updates['conv'])


def test_contract_inject_hyperparams_identical_and_schedulable():
  params = {k: jnp.asarray(v) for k, v in _weights().items()}
  plain = ec2t_jax.ec2t(_all_true, gamma=0.15, init_scale=0.3)
  injected = optax.inject_hyperparams(ec2t_jax.ec2t, static_args=('ternary_mask',))(
    _all_true, gamma=0.15, init_scale=0.3
  )
  s1, s2 = plain.init(params), injected.init(params)
  p1 = p2 = ec2t_jax.ternarize(params, s1)
  np.testing.assert_array_equal(p1['dense'], ec2t_jax.ternarize(params, s2)['dense'])
  for i in range(5):
    g = _grads(params, i)
    u1, s1 = jax.jit(plain.update)(g, s1, p1)
    u2, s2 = jax.jit(injected.update)(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    for k in SHAPES:
      np.testing.assert_array_equal(p1[k], p2[k])
  # A gamma schedule runs inside one compiled update.
  sched = optax.inject_hyperparams(ec2t_jax.ec2t, static_args=('ternary_mask',))(
    _all_true, gamma=optax.linear_schedule(0.0, 2.0, 10)
  )
  upd, traces = counting_jit(sched)
  s3 = sched.init(params)
  p3 = ec2t_jax.ternarize(params, s3)
  for i in range(6):
    u3, s3 = upd(_grads(params, i), s3, p3)
    p3 = optax.apply_updates(p3, u3)
  assert len(traces) == 1
  assert float(s3.hyperparams['gamma']) > 0.5
  _assert_exactly_ternary(p3, s3)


@pytest.mark.slow
def test_sharded_params_match_one_device():
  devices = jax.devices()
  if len(devices) < 8:
    pytest.skip('needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set in conftest)')
  mesh = jax.sharding.Mesh(np.array(devices[:8]), ('d',))
  shapes = {'conv': (3, 3, 4, 16), 'dense': (64, 8)}
  w = _weights(11, shapes)
  tx = ec2t_jax.ec2t(_all_true, gamma=0.3)
  spec = {
    'conv': jax.sharding.PartitionSpec(None, None, None, 'd'),
    'dense': jax.sharding.PartitionSpec('d', None),
  }
  sharded = {
    k: jax.device_put(jnp.asarray(v), jax.NamedSharding(mesh, spec[k])) for k, v in w.items()
  }
  single = {k: jax.device_put(jnp.asarray(v), devices[0]) for k, v in w.items()}

  def run(params):
    st = tx.init(params)
    params = ec2t_jax.ternarize(params, st)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(12)
    for _ in range(5):
      g = {k: rng.standard_normal(s).astype(np.float32) * 0.05 for k, s in shapes.items()}
      g = jax.tree.map(lambda x, p: jax.device_put(x, p.sharding), g, params)
      u, st = update(g, st, params)
      params = optax.apply_updates(params, u)
    return params, st

  p8, s8 = run(sharded)
  p1, s1 = run(single)
  assert len(p8['conv'].sharding.device_set) == 8
  for k in shapes:
    np.testing.assert_array_equal(np.asarray(p8[k]), np.asarray(p1[k]))
    np.testing.assert_array_equal(_state(s8).assignment[k], _state(s1).assignment[k])


# --- API, masks and errors ------------------------------------------------------------------------


class _TinyCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), name='stem')(x))
    x = nn.relu(nn.Conv(4, (3, 3), name='body')(x))
    x = nn.Conv(4, (1, 1), name='shortcut')(x)
    x = nn.relu(nn.Conv(4, (3, 3), name='body2')(x))
    return nn.Dense(3, name='head')(x.mean((1, 2)))


def test_default_ternary_mask_skips_first_last_and_shortcuts():
  x = jnp.zeros((1, 8, 8, 2))
  params = _TinyCNN().init(jax.random.key(0), x)['params']
  mask = ec2t_jax.default_ternary_mask(params)
  chosen = sorted(n for n, m in tree_util.named_leaves(mask) if m)
  assert chosen == ['body/kernel', 'body2/kernel']
  # After jit the dict is sorted ('body' first); the traced call order still finds the stem.
  order = ec2t_jax.masks.call_order(_TinyCNN(), x)
  assert order == ['stem', 'body', 'shortcut', 'body2', 'head']
  rebuilt = jax.jit(lambda p: p)(params)
  assert next(iter(rebuilt)) == 'body'
  mask = ec2t_jax.default_ternary_mask(rebuilt, order=order)
  assert sorted(n for n, m in tree_util.named_leaves(mask) if m) == chosen


def test_end_to_end_with_flax_model_and_summary():
  model = _TinyCNN()
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 2))
  y = jnp.array([0, 1, 2, 0])
  params = model.init(jax.random.key(0), x)['params']
  tx = ec2t_jax.ec2t(ec2t_jax.default_ternary_mask, gamma=0.15)
  opt_state = tx.init(params)
  params = ec2t_jax.ternarize(params, opt_state)

  @jax.jit
  def step(params, opt_state):
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({'params': p}, x), y
    ).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for _ in range(5):
    params, opt_state, loss = step(params, opt_state)
    assert np.isfinite(float(loss))
  _assert_exactly_ternary(params, opt_state)
  summary = ec2t_jax.summarize(opt_state)
  for key in ('sparsity', 'w_p', 'w_n', 'lambda', 'entropy_bits'):
    assert f'body/kernel/{key}' in summary
  assert 0.0 <= summary['total_sparsity'] <= 1.0
  assert summary['num_compressed'] == 3 * 3 * 4 * 4 * 2
  (state,) = ec2t_jax.compression_states(opt_state)
  assert state.centroids['body']['kernel'].shape == (2,)


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(gamma=-1.0), 'gamma must be >= 0, got -1.0'),
    (dict(init_scale=0.0), 'init_scale must be > 0, got 0.0'),
    (dict(p0_min=1.5), r'p0_min must be in \[0, 1\), got 1.5'),
    (dict(freeze_assignment_at=-2), 'freeze_assignment_at must be >= 0'),
  ],
)
def test_bad_hyperparameters_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ec2t_jax.ec2t(_all_true, **kwargs)


def test_bad_masks_are_refused():
  params = {'w': jnp.ones((3, 3)), 'steps': jnp.zeros((2,), jnp.int32)}
  with pytest.raises(ValueError, match='selects no parameter'):
    ec2t_jax.ec2t(lambda p: jax.tree.map(lambda _: False, p)).init(params)
  with pytest.raises(ValueError, match='steps has dtype int32'):
    ec2t_jax.ec2t({'w': True, 'steps': True}).init(params)
  with pytest.raises(ValueError, match='selected by both'):
    ec2t_jax.ec2t({'w': True, 'steps': False}, prune_mask={'w': True, 'steps': False}).init(params)
  with pytest.raises(ValueError, match='same tree structure'):
    ec2t_jax.ec2t({'w': True}).init(params)


def test_update_without_params_is_an_error():
  tx = transforms.ternary_training()
  params = {'w': jnp.ones((3, 3))}
  with pytest.raises(ValueError, match='needs the current params'):
    tx.update(params, tx.init(params))


def test_ternarize_needs_ec2t_state():
  with pytest.raises(ValueError, match='no EC2T state'):
    ec2t_jax.ternarize({'w': jnp.ones(3)}, optax.adam(1e-3).init({'w': jnp.ones(3)}))


@functools.partial(jax.jit, static_argnums=1)
def _degenerate_run(params, steps):
  tx = ec2t_jax.ec2t(_all_true, gamma=1e6)
  st = tx.init(params)
  p = ec2t_jax.ternarize(params, st)
  for i in range(steps):
    g = jax.tree.map(lambda x: jnp.full_like(x, 0.1 * (i + 1)), p)
    u, st = tx.update(g, st, p)
    p = optax.apply_updates(p, u)
  return p, st


@pytest.mark.slow
def test_degenerate_layers_through_the_optimizer_stay_finite():
  params = {
    'zeros': jnp.zeros((3, 3, 2, 2)),
    'const': jnp.full((4, 4), 0.5),
    'one': jnp.ones((1, 1)),
    'big': jnp.asarray(_weights()['dense']) * 1e6,  # huge values: see ternary_test
  }
  p, st = _degenerate_run(params, 4)
  for leaf in jax.tree.leaves((p, st)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  _assert_exactly_ternary(p, st)


def test_layer_weight_uses_the_largest_layer():
  assert ternary.layer_weight(288, 320) < ternary.layer_weight(320, 320) == pytest.approx(1.0)


def _all_eqns(jaxpr) -> int:
  """Equations of `jaxpr`, counting those of the jaxprs nested in them (cond branches, ...)."""
  nested = (j for e in jaxpr.eqns for v in e.params.values() for j in jaxprs.sub_jaxprs(v))
  return len(jaxpr.eqns) + sum(_all_eqns(j) for j in nested)


def test_grouped_layers_match_layer_by_layer():
  """`group_layers=True` (one buffer for all leaves) trains like one buffer per leaf."""
  shapes = {'a': (3, 3, 4, 8), 'b': (3, 3, 4, 8), 'c': (3, 3, 4, 8), 'd': (32, 10), 'e': (32, 10)}
  shapes['f'] = (5, 3)
  w0 = {k: jnp.asarray(v) for k, v in _weights(3, shapes).items()}
  runs = {}
  for group in (True, False):
    tx = ec2t_jax.ec2t(_all_true, group_layers=group, freeze_assignment_at=40, gamma=0.3)
    opt_state = tx.init(w0)
    params = ec2t_jax.ternarize(w0, opt_state)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(4)
    history = []
    for _ in range(60):
      grads = {k: (rng.standard_normal(s) * 0.02).astype(np.float32) for k, s in shapes.items()}
      updates, opt_state = update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      _assert_exactly_ternary(params, opt_state)
      history.append(jax.tree.map(np.asarray, _state(opt_state).assignment))
    # The update's own operations, nested ones (conditionals' branches) included.
    bare = ec2t_jax.ec2t(
      _all_true, group_layers=group, freeze_assignment_at=40, gamma=0.3, skip_nonfinite=False
    )
    eqns = _all_eqns(jax.make_jaxpr(bare.update)(grads, opt_state, params).jaxpr)
    runs[group] = (history, _state(opt_state), eqns)
  for step, (a, b) in enumerate(zip(runs[True][0], runs[False][0], strict=True)):
    for k in shapes:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f'{k} step {step}')
  grouped, single = runs[True][1], runs[False][1]
  for field in ('latent', 'centroids', 'centroid_latent', 'pmf', 'lam'):
    for k in shapes:
      np.testing.assert_allclose(
        getattr(grouped, field)[k], getattr(single, field)[k], rtol=1e-5, atol=1e-6
      )
  # One buffer: the grouped update traces far fewer operations than six leaves one by one.
  assert runs[True][2] < 0.75 * runs[False][2], (runs[True][2], runs[False][2])


def test_state_stores_the_leaves_of_one_dtype_in_one_buffer():
  """One `LayerGroup` per dtype, in rows of `CHUNK`; the properties give params-shaped trees."""
  shapes = {'a': (3, 3, 4, 8), 'b': (3, 3, 4, 8), 'c': (32, 10), 'd': (5, 3), 'e': (3, 3, 4, 8)}
  w0 = {k: jnp.asarray(v) for k, v in _weights(5, shapes).items()}
  w0['d'] = w0['d'].astype(jnp.bfloat16)
  state = ec2t_jax.ternary_training().init(w0)
  assert state.layout.groups == ((0, 1, 2, 4), (3,))  # Flat order a, b, c, d, e.
  chunk = fused.CHUNK
  assert chunk == 256  # 288 and 320 elements take two rows each, 15 one.
  assert [g.latent.shape for g in state.groups] == [(8, chunk), (1, chunk)]
  assert state.groups[1].latent.dtype == jnp.bfloat16
  assert [g.assignment.dtype for g in state.groups] == [jnp.int8] * 2
  assert [g.centroids.shape for g in state.groups] == [(4, 2), (1, 2)]
  assert [g.lam.shape for g in state.groups] == [(4,), (1,)]
  # Each leaf starts on a fresh row; its last row's tail is padding: 0, assigned to zero.
  first = state.groups[0]
  np.testing.assert_array_equal(first.latent[:2].reshape(-1)[:288], w0['a'].reshape(-1))
  np.testing.assert_array_equal(first.latent[1, 288 - chunk :], 0.0)
  np.testing.assert_array_equal(first.assignment[1, 288 - chunk :], ternary.ZERO)
  np.testing.assert_array_equal(state.latent['e'], w0['e'])
  assert jax.tree.structure(state.assignment) == jax.tree.structure(w0)
  for k, leaf in state.pmf.items():
    assert leaf.shape == (3,), k
  # The inner optimizers see one array per buffer.
  (adam, _) = state.latent_opt_state
  assert [m.shape for m in adam.mu] == [g.latent.shape for g in state.groups]
  # Layer by layer: one buffer per leaf.
  single = ec2t_jax.ternary_training(group_layers=False).init(w0)
  assert single.layout.groups == tuple((i,) for i in range(5))
  assert [g.latent.shape[0] for g in single.groups] == [2, 2, 2, 1, 2]
  # An abstract state (as for checkpoint targets) has abstract views.
  abstract = jax.eval_shape(ec2t_jax.ternary_training().init, w0)
  assert abstract.assignment['b'] == jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.int8)
  assert abstract.latent['d'] == jax.ShapeDtypeStruct((5, 3), jnp.bfloat16)
  assert abstract.centroids['d'] == jax.ShapeDtypeStruct((2,), jnp.float32)


def test_flat_state_keeps_other_leaves_as_placeholders_and_checkpoints():
  """Under `optax.partition` the views hold MaskedNode placeholders; the layout is static."""
  w0 = {k: jnp.asarray(v) for k, v in _weights(6).items()}
  mask = lambda p: {k: k != 'dense' for k in p}
  tx = ec2t_jax.ec2t(mask)
  opt_state = tx.init(w0)
  (state,) = ec2t_jax.compression_states(opt_state)
  assert isinstance(state.assignment['dense'], optax.MaskedNode)
  assert not isinstance(state.assignment['conv'], optax.MaskedNode)
  # The layout holds no arrays: flattening and rebuilding the state round-trips it.
  leaves, treedef = jax.tree.flatten(opt_state)
  assert all(isinstance(x, jax.Array) for x in leaves)
  rebuilt = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
  (again,) = ec2t_jax.compression_states(rebuilt)
  assert again.layout == state.layout
  np.testing.assert_array_equal(again.assignment['conv'], state.assignment['conv'])


def test_multi_steps_accumulates_and_stays_exactly_ternary():
  """Under `optax.MultiSteps` the fused state steps every k-th update; params stay ternary."""
  w0 = {k: jnp.asarray(v) for k, v in _weights(7).items()}
  tx = optax.MultiSteps(ec2t_jax.ec2t(_all_true, gamma=0.3), every_k_schedule=3)
  opt_state = tx.init(w0)
  params = ec2t_jax.ternarize(w0, opt_state)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(8)
  for _ in range(7):
    grads = {k: (rng.standard_normal(s) * 0.02).astype(np.float32) for k, s in SHAPES.items()}
    updates, opt_state = update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    _assert_exactly_ternary(params, opt_state)
  assert int(_state(opt_state).count) == 2  # Updates 3 and 6 of 7.


def test_a_nan_anywhere_skips_the_ternary_part_once_ec2t_guards_and_only_then():
  """`guard_nonfinite`: ec2t's own guard covers the ternary state; without any guard NaN flows."""
  params = {'w': jnp.linspace(-1.0, 1.0, 24).reshape(4, 6), 'b': jnp.ones((6,))}
  mask = {'w': True, 'b': False}
  grads = {'w': jnp.full((4, 6), 0.1), 'b': jnp.array([jnp.nan, 0, 0, 0, 0, 0])}

  def after(tx, g):
    state = tx.init(params)
    p = ec2t_jax.ternarize(params, state)
    updates, new_state = jax.jit(tx.update)(g, state, p)
    return state, new_state, updates

  # The NaN is in the full-precision leaf only: ec2t's skip keeps the ternary state too.
  old, new, updates = after(ec2t_jax.ec2t(mask), grads)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.any(np.asarray(updates['w']))
  # Without skip_nonfinite the ternary part steps on its finite gradients ...
  _, new, _ = after(ec2t_jax.ec2t(mask, skip_nonfinite=False), grads)
  assert int(_state(new).count) == 1
  # ... and skips a NaN of its own unless guard_nonfinite=False, which lets it through.
  nan_w = {**grads, 'w': grads['w'].at[0, 0].set(jnp.nan)}
  old, new, _ = after(ec2t_jax.ec2t(mask, skip_nonfinite=False), nan_w)
  np.testing.assert_array_equal(_state(new).latent['w'], _state(old).latent['w'])
  _, new, _ = after(ec2t_jax.ec2t(mask, skip_nonfinite=False, guard_nonfinite=False), nan_w)
  assert np.isnan(np.asarray(_state(new).latent['w'])).any()


_MULTI_OUTPUT_FUSION_PROGRAM = """
import jax, jax.numpy as jnp, numpy as np, ec2t_jax
params = {f'w{i}': jnp.linspace(-1.0, 1.0, n).reshape(-1, 4) for i, n in enumerate((24, 24, 40))}
tx = ec2t_jax.ternary_training()
state = tx.init(params)
grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
updates, _ = jax.jit(tx.update)(grads, state, ec2t_jax.ternarize(params, state))
print(all(bool(np.isfinite(u).all()) for u in jax.tree.leaves(updates)))
"""


def test_the_fused_update_compiles_under_xla_cpu_multi_output_fusion():
  """XLA:CPU's opt-in multi-output fusion merged the sum and min segment scatters into one
  kernel and aborted the process (jaxlib 0.10.2); the min's ids now come through a fence."""
  env = {k: v for k, v in os.environ.items() if k != 'JAX_DISABLE_MOST_OPTIMIZATIONS'}
  env.update(
    JAX_PLATFORMS='cpu',
    JAX_ENABLE_COMPILATION_CACHE='false',
    XLA_FLAGS='--xla_backend_extra_options=xla_cpu_use_multi_output_fusion',
  )
  proc = subprocess.run(
    [sys.executable, '-c', _MULTI_OUTPUT_FUSION_PROGRAM],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == 'True'
