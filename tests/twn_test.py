"""Tests of the Ternary Weight Networks baseline (`ec2t_jax.twn`, `config.method='twn'`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import counting_jit

import ec2t_jax
from ec2t_jax import export, methods, twn

W = np.array([0.5, -1.0, 0.25, 0.25], np.float32)  # Δ = 0.35, α = mean(0.5, 1.0) = 0.75.
MASK = {'conv': True, 'dense': True, 'bias': False}
SETTINGS = {'latent_learning_rate': 1e-3, 'learning_rate': 0.5, 'weight_decay': 0.0}


def _weights(seed=0):
  rng = np.random.default_rng(seed)
  return {
    'conv': jnp.asarray(rng.standard_normal((3, 3, 4, 8)) * 0.1, jnp.float32),
    'dense': jnp.asarray(rng.standard_normal((32, 10)) * 0.1, jnp.float32),
    'bias': jnp.zeros((10,), jnp.float32),
  }


def _grads(params, seed):
  rng = np.random.default_rng(100 + seed)
  return jax.tree.map(
    lambda p: jnp.asarray(rng.standard_normal(p.shape) * 0.1, jnp.asarray(p).dtype), params
  )


def _latent(opt_state):
  (state,) = twn.states(opt_state)
  return state.latent


def _numpy_twn(w):
  """TWN's quantizer by hand, in float64: (Δ, α, kernel)."""
  w = np.asarray(w, np.float64)
  delta = 0.7 * np.mean(np.abs(w))
  kept = np.abs(w) > delta
  alpha = np.mean(np.abs(w[kept])) if kept.any() else 0.0
  return delta, alpha, np.where(kept, np.sign(w) * alpha, 0.0)


def _assert_symmetric_ternary(values, alpha=None):
  """`values` hold only {-α, 0, +α} (bit for bit), with no -0.0; returns α."""
  v = np.asarray(values, np.float64)
  levels = np.unique(np.abs(v[v != 0]))
  assert levels.size <= 1, f'more than one magnitude: {levels}'
  assert not np.any(np.signbit(v[v == 0])), '-0.0 in a ternary leaf'
  if alpha is not None and levels.size:
    assert levels[0] == alpha
  return float(levels[0]) if levels.size else 0.0


# --- the quantizer ----------------------------------------------------------------------------


def test_quantizer_on_literal_arrays():
  assert float(twn.twn_threshold(W)) == pytest.approx(0.35, rel=1e-6)
  assert float(twn.twn_scale(W)) == 0.75
  np.testing.assert_array_equal(twn.twn_quantize(W), [0.75, -0.75, 0.0, 0.0])
  np.testing.assert_array_equal(twn.twn_assignment(W), [2, 0, 1, 1])
  # mean|W| = 0.15, Δ = 0.105: 0.1 is dropped; α = mean(0.3, 0.2) = 0.25.
  w = jnp.array([[0.3, -0.1], [0.0, -0.2]])
  alpha = float(twn.twn_scale(w))
  assert alpha == pytest.approx(0.25, rel=1e-6)
  np.testing.assert_array_equal(twn.twn_quantize(w), [[alpha, 0.0], [0.0, -alpha]])
  # Equal magnitudes: Δ = 0.7 keeps them all, α = 1.
  np.testing.assert_array_equal(twn.twn_quantize(jnp.array([1.0, -1.0, 1.0])), [1.0, -1.0, 1.0])


def test_quantizer_matches_a_hand_computation_on_random_layers():
  rng = np.random.default_rng(3)
  for shape in [(7,), (16, 8), (3, 3, 4, 5)]:
    w = rng.standard_normal(shape).astype(np.float32) * 0.05
    delta, alpha, kernel = _numpy_twn(w)
    assert float(twn.twn_threshold(w)) == pytest.approx(delta, rel=1e-6)
    assert float(twn.twn_scale(w)) == pytest.approx(alpha, rel=1e-6)
    q = np.asarray(twn.twn_quantize(w))
    np.testing.assert_array_equal(q != 0, kernel != 0)
    np.testing.assert_allclose(q, kernel, rtol=1e-6)
    _assert_symmetric_ternary(q, float(twn.twn_scale(w)))


def test_quantizer_of_zeros_is_plus_zero():
  for w in (jnp.zeros(4), jnp.array([0.0, -0.0, 0.0])):
    assert float(twn.twn_scale(w)) == 0.0
    q = np.asarray(twn.twn_quantize(w))
    np.testing.assert_array_equal(q, 0.0)
    assert not np.any(np.signbit(q))
  # Small negative weights below Δ become +0.0, not -0.0 (the export format refuses -0.0).
  q = np.asarray(twn.twn_quantize(jnp.array([1.0, -1.0, -0.01, 1.0])))
  np.testing.assert_array_equal(q, [1.0, -1.0, 0.0, 1.0])
  assert not np.signbit(q[2])


def test_quantizer_keeps_the_requested_dtype_and_grid():
  q = twn.twn_quantize(jnp.asarray(W, jnp.bfloat16))
  assert q.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(q, np.float32), [0.75, -0.75, 0.0, 0.0])
  # α = 0.3 lies on the float32 grid but not on bfloat16's: the bfloat16 level is its own.
  w = np.array([0.3, -0.3, 0.0], np.float32)
  alpha32, alpha16 = float(twn.twn_scale(w)), float(twn.twn_scale(w, jnp.bfloat16))
  assert alpha32 == pytest.approx(0.3, rel=1e-6) and alpha16 == pytest.approx(0.3, rel=2e-2)
  assert alpha16 == float(jnp.asarray(alpha16, jnp.bfloat16)) and alpha16 != alpha32
  q = twn.twn_quantize(w, jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(q, np.float32), [alpha16, -alpha16, 0.0])


# --- the optimizer ----------------------------------------------------------------------------


def test_init_keeps_float32_latent_and_ternarize_places_q():
  params = {'k': jnp.asarray(W, jnp.bfloat16), 'b': jnp.ones(2)}
  tx = twn.twn_ternary({'k': True, 'b': False})
  state = tx.init(params)
  latent = _latent(state)['k']
  assert latent.dtype == jnp.float32
  np.testing.assert_array_equal(latent, W)
  placed = ec2t_jax.ternarize(params, state)
  assert placed['k'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(placed['k'], np.float32), [0.75, -0.75, 0.0, 0.0])
  np.testing.assert_array_equal(placed['b'], params['b'])


def test_ste_moves_latent_by_exactly_the_sgd_step():
  params = {'k': jnp.asarray(W)}
  tx = twn.twn_ternary({'k': True}, latent_optimizer=optax.sgd(0.1))
  state = tx.init(params)
  params = ec2t_jax.ternarize(params, state)
  g = np.array([1.0, -2.0, -1.0, 0.5], np.float32)
  updates, state = jax.jit(tx.update)({'k': jnp.asarray(g)}, state, params)
  params = optax.apply_updates(params, updates)
  # The gradient w.r.t. the kernel goes to W unchanged: W ← W − 0.1·g.
  latent = np.asarray(_latent(state)['k'])
  np.testing.assert_array_equal(latent, W + np.float32(-0.1) * g)
  np.testing.assert_allclose(latent, [0.4, -0.8, 0.35, 0.2], rtol=1e-5)
  # Δ = 0.7 · 1.75/4 = 0.30625 keeps 0.4, -0.8, 0.35; α = 1.55/3.
  alpha = float(twn.twn_scale(latent))
  assert alpha == pytest.approx(1.55 / 3, rel=1e-5)
  np.testing.assert_array_equal(params['k'], [alpha, -alpha, alpha, 0.0])


def test_ste_moves_latent_by_exactly_the_adam_step():
  params = _weights()
  adam = optax.adam(1e-3)
  tx = twn.twn_ternary(MASK, latent_optimizer=adam, fp_optimizer=optax.sgd(0.5))
  state = tx.init(params)
  params = ec2t_jax.ternarize(params, state)
  before = _latent(state)
  g = _grads(params, 0)
  updates, state = jax.jit(tx.update)(g, state, params)
  after = _latent(state)
  for k in ('conv', 'dense'):
    step, _ = adam.update(g[k], adam.init(before[k]), before[k])
    np.testing.assert_allclose(after[k], optax.apply_updates(before[k], step), rtol=1e-5)
    # Adam's first step is lr·g/(|g| + eps): every latent weight moves by about 1e-3.
    np.testing.assert_allclose(np.abs(after[k] - before[k]), 1e-3, rtol=1e-3)
  np.testing.assert_allclose(updates['bias'], -0.5 * g['bias'], rtol=1e-5)


def test_params_stay_exactly_ternary_per_layer():
  params = _weights()
  tx = twn.twn_ternary(MASK)
  state = tx.init(params)
  params = ec2t_jax.ternarize(params, state)
  update = jax.jit(tx.update)
  for i in range(5):
    updates, state = update(_grads(params, i), state, params)
    params = optax.apply_updates(params, updates)
    kernels = ec2t_jax.compressed_kernels(state, params)
    assert set(kernels) == {'conv', 'dense'}
    for k in kernels:
      np.testing.assert_array_equal(params[k], kernels[k])
      _assert_symmetric_ternary(params[k], float(twn.twn_scale(_latent(state)[k])))
      assert np.unique(np.asarray(params[k])).size == 3


def test_first_update_from_full_precision_params_is_exact():
  # Without `ternarize` after init the first update still replaces the params by Q(W).
  params = _weights()
  tx = twn.twn_ternary(MASK)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(_grads(params, 0), state, params)
  params = optax.apply_updates(params, updates)
  kernels = ec2t_jax.compressed_kernels(state, params)
  for k in ('conv', 'dense'):
    np.testing.assert_array_equal(params[k], kernels[k])
    np.testing.assert_array_equal(params[k], twn.twn_quantize(_latent(state)[k]))
    _assert_symmetric_ternary(params[k])


def test_contract_jit_compiles_once_and_preserves_bfloat16():
  params = _weights()
  params['half'] = jnp.asarray(_weights(3)['dense'], jnp.bfloat16)
  tx = twn.twn_ternary(lambda p: {k: k != 'bias' for k in p})
  state = tx.init(params)
  params = ec2t_jax.ternarize(params, state)
  update, traces = counting_jit(tx)
  for i in range(3):
    updates, state = update(_grads(params, i), state, params)
    params = optax.apply_updates(params, updates)
  assert len(traces) == 1, 'recompiled: the state changed type or shape'
  for k in params:
    assert updates[k].dtype == params[k].dtype
  assert params['half'].dtype == jnp.bfloat16
  alpha = float(twn.twn_scale(_latent(state)['half'], jnp.bfloat16))
  _assert_symmetric_ternary(np.asarray(params['half'], np.float32), alpha)


def test_contract_inside_masked_and_partition():
  params = _weights()
  tx = optax.masked(twn.twn_ternary_training(), MASK)
  state = tx.init(params)
  g = _grads(params, 0)
  updates, _ = jax.jit(tx.update)(g, state, params)
  np.testing.assert_array_equal(updates['bias'], g['bias'])
  labels = {'conv': 'a', 'dense': 'a', 'bias': 'b'}
  tx2 = optax.partition({'a': twn.twn_ternary_training(), 'b': optax.sgd(0.1)}, labels)
  updates2, _ = jax.jit(tx2.update)(g, tx2.init(params), params)
  np.testing.assert_array_equal(updates2['conv'], updates['conv'])
  np.testing.assert_array_equal(updates2['dense'], updates['dense'])


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_nonfinite_gradient_keeps_latent_adam_state_and_params(bad):
  params = {'k': jnp.asarray(W)}
  tx = twn.twn_ternary_training(latent_optimizer=optax.adam(0.1))
  state = tx.init(params)
  params = ec2t_jax.ternarize(params, state)
  update = jax.jit(tx.update)
  updates, state = update({'k': jnp.array([1.0, -2.0, -1.0, 0.5])}, state, params)
  params = optax.apply_updates(params, updates)
  assert int(optax.tree.get(state.latent_opt_state, 'count')) == 1
  updates, new = update({'k': jnp.array([bad, 0.0, 1.0, 0.0])}, state, params)
  np.testing.assert_array_equal(new.latent['k'], state.latent['k'])
  jax.tree.map(np.testing.assert_array_equal, new.latent_opt_state, state.latent_opt_state)
  assert int(optax.tree.get(new.latent_opt_state, 'count')) == 1
  np.testing.assert_array_equal(updates['k'], 0.0)
  assert not np.any(np.signbit(np.asarray(updates['k'])))
  np.testing.assert_array_equal(optax.apply_updates(params, updates)['k'], params['k'])


# --- reading the state --------------------------------------------------------------------------


def test_statistics_summarize_and_compression_states_read_the_twn_state():
  params = {'k': jnp.asarray(W), 'b': jnp.zeros(3)}
  state = twn.twn_ternary({'k': True, 'b': False}).init(params)
  assert ec2t_jax.compression_states(state) == twn.states(state)
  stats = ec2t_jax.summarize(state)
  assert stats['k/sparsity'] == 0.5 and stats['total_sparsity'] == 0.5
  assert stats['k/w_p'] == stats['k/w_n'] == 0.75
  assert stats['k/entropy_bits'] == pytest.approx(1.5)  # P = (1/4, 1/2, 1/4).
  assert stats['num_compressed'] == 4
  assert 'k/lambda' not in stats
  jitted = jax.jit(ec2t_jax.statistics)(state, params)
  assert float(jitted['k/w_p']) == 0.75 and float(jitted['total_sparsity']) == 0.5


def test_statistics_of_bfloat16_params_are_the_levels_in_the_params():
  rng = np.random.default_rng(7)
  latent = jnp.asarray(rng.standard_normal((16, 8)) * 0.1, jnp.float32)
  params = {'k': latent.astype(jnp.bfloat16), 'b': jnp.zeros(3)}
  tx = twn.twn_ternary({'k': True, 'b': False}, latent_optimizer=optax.sgd(0.1))
  state = tx.init(params)
  params = ec2t_jax.ternarize(params, state)
  updates, state = tx.update(_grads(params, 0), state, params)
  params = optax.apply_updates(params, updates)
  alpha = _assert_symmetric_ternary(np.asarray(params['k'], np.float32))
  stats = ec2t_jax.summarize(state, params)
  assert stats['k/w_p'] == stats['k/w_n'] == alpha
  zeros = float(np.mean(np.asarray(params['k'], np.float32) == 0))
  assert stats['k/sparsity'] == pytest.approx(zeros, abs=1e-7)
  with pytest.raises(ValueError, match=r"opt_state holds 'k', which is not a leaf of params"):
    ec2t_jax.statistics(state, {'b': params['b']})
  with pytest.raises(ValueError, match=r"opt_state holds 'k', which is not a leaf of params"):
    ec2t_jax.compressed_kernels(state, {'b': params['b']})


def test_export_packs_the_twn_layers_as_ternary():
  params = _weights()
  tx = twn.twn_ternary(MASK)
  state = tx.init(params)
  params = ec2t_jax.ternarize(params, state)
  updates, state = tx.update(_grads(params, 0), state, params)
  params = optax.apply_updates(params, updates)
  variables = {'params': jax.device_get(params)}
  assert export.ternary_leaves(variables, state) == {'params/conv', 'params/dense'}


# --- the method -------------------------------------------------------------------------------


def test_method_builds_the_optimizer_from_settings():
  method = methods.get('twn')
  assert method is twn.TWN and method.name == 'twn' and not method.can_prune
  params = _weights()
  tx = method.optimizer(SETTINGS, MASK, freeze_at=3)
  state = tx.init(params)
  params = ec2t_jax.ternarize(params, state)
  before = _latent(state)
  g = _grads(params, 0)
  updates, state = jax.jit(tx.update)(g, state, params)
  for k in ('conv', 'dense'):
    # Adam with settings['latent_learning_rate'] on the latent weights.
    np.testing.assert_allclose(np.abs(_latent(state)[k] - before[k]), 1e-3, rtol=1e-3)
  # default_fp_optimizer(learning_rate, weight_decay) on the others: Adam's first step.
  np.testing.assert_allclose(np.abs(updates['bias']), 0.5, rtol=1e-3)
  with pytest.raises(ValueError, match=r"config.method='twn' ternarizes only; it cannot prune"):
    method.optimizer({**SETTINGS, 'prune_pattern': 'dense'}, MASK, prune_mask=MASK)
  with pytest.raises(ValueError, match=r"the 'twn' method needs the settings 'weight_decay'"):
    method.optimizer({'latent_learning_rate': 1e-3, 'learning_rate': 1e-3}, MASK)


def test_bad_arguments_are_refused():
  tx = twn.twn_ternary_training()
  with pytest.raises(ValueError, match=r'twn_ternary_training is given i of dtype int'):
    tx.init({'i': jnp.arange(3)})
  with pytest.raises(ValueError, match=r'ternary_mask selects no parameter'):
    twn.twn_ternary({'k': False}).init({'k': jnp.asarray(W)})
  with pytest.raises(ValueError, match=r'needs the current params'):
    tx.update({'k': jnp.asarray(W)}, tx.init({'k': jnp.asarray(W)}))


def test_public_api():
  assert ec2t_jax.twn_ternary is twn.twn_ternary
  assert ec2t_jax.twn is twn
  assert isinstance(
    twn.twn_ternary(MASK).init(_weights()).inner_states['ternary'].inner_state,
    twn.TwnTrainingState,
  )
