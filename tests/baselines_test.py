"""Tests of the BitNet b1.58 absmean baseline (`ec2t_jax.baselines`) and `config.method`."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import counting_jit

import ec2t_jax
from ec2t_jax import baselines, export, tree_util
from ec2t_jax.training import setup as setup_lib
from ec2t_jax.training import train
from ec2t_jax.training import workdir as workdir_lib

W = np.array([0.5, -1.0, 0.25, 0.25], np.float32)  # mean|W| = 0.5: Q(W) = [m, -m, 0, 0].


def _weights(seed=0):
  rng = np.random.default_rng(seed)
  return {
    'conv': jnp.asarray(rng.standard_normal((3, 3, 4, 8)) * 0.1, jnp.float32),
    'dense': jnp.asarray(rng.standard_normal((32, 10)) * 0.1, jnp.float32),
    'bias': jnp.zeros((10,), jnp.float32),
  }


MASK = {'conv': True, 'dense': True, 'bias': False}


def _grads(params, seed):
  rng = np.random.default_rng(100 + seed)
  return jax.tree.map(
    lambda p: jnp.asarray(rng.standard_normal(p.shape) * 0.1, jnp.asarray(p).dtype), params
  )


def _latent(opt_state):
  (state,) = baselines.states(opt_state)
  return state.latent


def _assert_symmetric_ternary(values, m=None):
  """`values` hold only {-m, 0, +m} (bit for bit), with no -0.0; returns m."""
  v = np.asarray(values, np.float64)
  levels = np.unique(np.abs(v[v != 0]))
  assert levels.size <= 1, f'more than one magnitude: {levels}'
  assert not np.any(np.signbit(v[v == 0])), '-0.0 in a ternary leaf'
  if m is not None and levels.size:
    assert levels[0] == m
  return float(levels[0]) if levels.size else 0.0


# --- the quantizer ----------------------------------------------------------------------------


def test_quantizer_on_literal_arrays():
  np.testing.assert_array_equal(baselines.absmean_quantize(W), [0.5, -0.5, 0.0, 0.0])
  # mean|W| = 0.15; W/m = [2, -2/3, 0, -4/3] → [1, -1, 0, -1] after rounding and clipping.
  w = jnp.array([[0.3, -0.1], [0.0, -0.2]])
  m = float(baselines.absmean_scale(w))
  assert m == pytest.approx(0.15, rel=1e-5)
  np.testing.assert_array_equal(baselines.absmean_quantize(w), [[m, -m], [0.0, -m]])
  # Rounding: |w| < m/2 → 0. mean|[0.9, 0.1, -0.1, -0.9]| = 0.5; 0.1/0.5 = 0.2 → 0.
  np.testing.assert_array_equal(
    baselines.absmean_quantize(jnp.array([0.9, 0.1, -0.1, -0.9])), [0.5, 0.0, 0.0, -0.5]
  )


def test_quantizer_of_zeros_and_negative_zeros_is_plus_zero():
  q = baselines.absmean_quantize(jnp.array([0.0, -0.0, 0.0]))
  np.testing.assert_array_equal(q, [0.0, 0.0, 0.0])
  assert not np.any(np.signbit(np.asarray(q)))
  # Small negative weights round to +0.0, not -0.0 (the export format refuses -0.0).
  q = np.asarray(baselines.absmean_quantize(jnp.array([1.0, -1.0, -0.01, 1.0])))
  assert q[2] == 0 and not np.signbit(q[2])


def test_quantizer_keeps_the_requested_dtype():
  q = baselines.absmean_quantize(jnp.asarray(W, jnp.bfloat16))
  assert q.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(q, np.float32), [0.5, -0.5, 0.0, 0.0])


# --- the optimizer ------------------------------------------------------------------------


def test_init_keeps_float32_latent_and_ternarize_places_q():
  params = {'k': jnp.asarray(W, jnp.bfloat16), 'b': jnp.ones(2)}
  tx = baselines.absmean_ternary({'k': True, 'b': False})
  state = tx.init(params)
  latent = _latent(state)['k']
  assert latent.dtype == jnp.float32
  np.testing.assert_array_equal(latent, W)
  placed = ec2t_jax.ternarize(params, state)
  assert placed['k'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(placed['k'], np.float32), [0.5, -0.5, 0.0, 0.0])
  np.testing.assert_array_equal(placed['b'], params['b'])


def test_ste_moves_latent_by_exactly_the_sgd_step():
  params = {'k': jnp.asarray(W)}
  tx = baselines.absmean_ternary({'k': True}, latent_optimizer=optax.sgd(0.1))
  state = tx.init(params)
  params = ec2t_jax.ternarize(params, state)
  g = np.array([1.0, -2.0, -1.0, 0.5], np.float32)
  updates, state = jax.jit(tx.update)({'k': jnp.asarray(g)}, state, params)
  params = optax.apply_updates(params, updates)
  # The gradient w.r.t. Q(W) goes to W unchanged: W ← W − 0.1·g.
  latent = np.asarray(_latent(state)['k'])
  np.testing.assert_array_equal(latent, W + np.float32(-0.1) * g)
  np.testing.assert_allclose(latent, [0.4, -0.8, 0.35, 0.2], rtol=1e-5)
  # m = mean|W| = 1.75/4 = 0.4375; W/m = [0.91, -1.83, 0.8, 0.46] → [1, -1, 1, 0].
  m = float(baselines.absmean_scale(latent))
  assert m == pytest.approx(0.4375, rel=1e-5)
  np.testing.assert_array_equal(params['k'], [m, -m, m, 0.0])


def test_ste_moves_latent_by_exactly_the_adam_step():
  params = _weights()
  adam = optax.adam(1e-3)
  tx = baselines.absmean_ternary(MASK, latent_optimizer=adam, fp_optimizer=optax.sgd(0.5))
  state = tx.init(params)
  params = ec2t_jax.ternarize(params, state)
  before = _latent(state)
  g = _grads(params, 0)
  updates, state = jax.jit(tx.update)(g, state, params)
  after = _latent(state)
  for k in ('conv', 'dense'):
    step, _ = adam.update(g[k], adam.init(before[k]), before[k])
    # The same step (to float rounding: jit fuses Adam's arithmetic differently).
    np.testing.assert_allclose(after[k], optax.apply_updates(before[k], step), rtol=1e-5)
    # Adam's first step is lr·g/(|g| + eps): every latent weight moves by about 1e-3.
    np.testing.assert_allclose(np.abs(after[k] - before[k]), 1e-3, rtol=1e-3)
  # The other leaves follow fp_optimizer (here SGD 0.5) on the params.
  np.testing.assert_allclose(updates['bias'], -0.5 * g['bias'], rtol=1e-5)


def test_update_is_q_of_new_latent_minus_params_and_exactly_ternary():
  params = _weights()
  tx = baselines.absmean_ternary(MASK)
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
      m = float(baselines.absmean_scale(_latent(state)[k]))
      _assert_symmetric_ternary(params[k], m)


def test_first_update_from_full_precision_params_is_ternary():
  # Without `ternarize` after init the first update still replaces the params by Q(W).
  params = _weights()
  tx = baselines.absmean_ternary(MASK)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(_grads(params, 0), state, params)
  params = optax.apply_updates(params, updates)
  kernels = ec2t_jax.compressed_kernels(state, params)
  for k in ('conv', 'dense'):
    _assert_symmetric_ternary(params[k])
    assert np.unique(np.asarray(params[k])).size == 3
    # Exactly Q(W) of the new latent weights: the `-p` fallback zeroed nothing.
    np.testing.assert_array_equal(params[k], kernels[k])
    np.testing.assert_array_equal(params[k], baselines.absmean_quantize(_latent(state)[k]))


def test_contract_jit_compiles_once_and_preserves_dtype():
  params = _weights()
  params['half'] = jnp.asarray(_weights(3)['dense'], jnp.bfloat16)
  tx = baselines.absmean_ternary(lambda p: {k: k != 'bias' for k in p})
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
  _assert_symmetric_ternary(params['half'])


def test_contract_inside_masked_and_partition():
  params = _weights()
  tx = optax.masked(baselines.absmean_ternary_training(), MASK)
  state = tx.init(params)
  g = _grads(params, 0)
  updates, state = jax.jit(tx.update)(g, state, params)
  np.testing.assert_array_equal(updates['bias'], g['bias'])
  labels = {'conv': 'a', 'dense': 'a', 'bias': 'b'}
  tx2 = optax.partition({'a': baselines.absmean_ternary_training(), 'b': optax.sgd(0.1)}, labels)
  updates2, _ = jax.jit(tx2.update)(g, tx2.init(params), params)
  np.testing.assert_array_equal(updates2['conv'], updates['conv'])
  np.testing.assert_array_equal(updates2['dense'], updates['dense'])


def test_contract_inject_hyperparams_identical():
  params = _weights()
  plain = baselines.absmean_ternary(MASK, eps=1e-4)
  injected = optax.inject_hyperparams(baselines.absmean_ternary, static_args=('ternary_mask',))(
    MASK, eps=1e-4
  )
  s1, s2 = plain.init(params), injected.init(params)
  p1 = ec2t_jax.ternarize(params, s1)
  p2 = ec2t_jax.ternarize(params, s2)
  for i in range(3):
    g = _grads(params, i)
    u1, s1 = jax.jit(plain.update)(g, s1, p1)
    u2, s2 = jax.jit(injected.update)(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    for k in params:
      np.testing.assert_array_equal(p1[k], p2[k])


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_nonfinite_gradient_keeps_latent_adam_state_and_params(bad):
  params = {'k': jnp.asarray(W)}
  tx = baselines.absmean_ternary_training(latent_optimizer=optax.adam(0.1))
  state = tx.init(params)
  params = ec2t_jax.ternarize(params, state)
  update = jax.jit(tx.update)
  # One finite step first, so Adam's moments and count are not their initial zeros.
  updates, state = update({'k': jnp.array([1.0, -2.0, -1.0, 0.5])}, state, params)
  params = optax.apply_updates(params, updates)
  assert int(optax.tree.get(state.latent_opt_state, 'count')) == 1
  updates, new = update({'k': jnp.array([bad, 0.0, 1.0, 0.0])}, state, params)
  np.testing.assert_array_equal(new.latent['k'], state.latent['k'])
  jax.tree.map(np.testing.assert_array_equal, new.latent_opt_state, state.latent_opt_state)
  assert int(optax.tree.get(new.latent_opt_state, 'count')) == 1
  np.testing.assert_array_equal(new.quantizer_eps, state.quantizer_eps)
  np.testing.assert_array_equal(updates['k'], 0.0)
  assert not np.any(np.signbit(np.asarray(updates['k'])))
  np.testing.assert_array_equal(optax.apply_updates(params, updates)['k'], params['k'])


def test_update_quantizes_with_the_eps_in_the_state():
  # A leaf of zeros: m = 0, so Q(W) = round(clip(W / ε)) · 0 hides ε; take W with
  # |W| ≈ ε instead, where ε decides the rounding (W/(m + ε) = 1/2 vs ≈ 1).
  params = {'k': jnp.full((4,), 1e-3, jnp.float32)}
  tx = baselines.absmean_ternary_training(latent_optimizer=optax.sgd(0.0), eps=1e-5)
  state = tx.init(params)
  params = ec2t_jax.ternarize(params, state)
  m = float(baselines.absmean_scale(params['k']))
  np.testing.assert_array_equal(params['k'], m)  # W/(m + 1e-5) ≈ 0.99 → 1.
  # The same state with ε = m: W/(m + ε) = 1/2 rounds to 0 (to even), and the update
  # must quantize with that ε, as `ternarize` and `compressed_kernels` do.
  state = state._replace(quantizer_eps=jnp.asarray(m, jnp.float32))
  updates, state = tx.update({'k': jnp.zeros(4)}, state, params)
  params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params['k'], 0.0)
  np.testing.assert_array_equal(params['k'], ec2t_jax.compressed_kernels(state, params)['k'])


def test_statistics_read_the_absmean_state():
  params = {'k': jnp.asarray(W), 'b': jnp.zeros(3)}
  state = baselines.absmean_ternary({'k': True, 'b': False}).init(params)
  stats = ec2t_jax.summarize(state)
  assert stats['k/sparsity'] == 0.5 and stats['total_sparsity'] == 0.5
  assert stats['k/w_p'] == stats['k/w_n'] == 0.5
  assert stats['k/entropy_bits'] == pytest.approx(1.5)  # P = (1/4, 1/2, 1/4).
  assert stats['num_compressed'] == 4


def test_statistics_and_report_levels_of_bfloat16_params_are_those_in_the_params():
  rng = np.random.default_rng(7)
  latent = jnp.asarray(rng.standard_normal((16, 8)) * 0.1, jnp.float32)
  params = {'k': latent.astype(jnp.bfloat16), 'b': jnp.zeros(3)}
  tx = baselines.absmean_ternary({'k': True, 'b': False}, latent_optimizer=optax.sgd(0.1))
  state = tx.init(params)
  params = ec2t_jax.ternarize(params, state)
  updates, state = tx.update(_grads(params, 0), state, params)
  params = optax.apply_updates(params, updates)
  assert params['k'].dtype == jnp.bfloat16
  m = _assert_symmetric_ternary(np.asarray(params['k'], np.float32))
  # The float32 grid gives another level: the test would not see a float32 m.
  assert m != float(baselines.absmean_scale(_latent(state)['k']))
  stats = ec2t_jax.summarize(state, params)
  assert stats['k/w_p'] == stats['k/w_n'] == m
  zeros = float(np.mean(np.asarray(params['k'], np.float32) == 0))
  assert stats['k/sparsity'] == pytest.approx(zeros, abs=1e-7)
  jitted = jax.jit(ec2t_jax.statistics)(state, params)
  assert float(jitted['k/w_p']) == m
  with pytest.raises(ValueError, match=r"opt_state holds 'k', which is not a leaf of params"):
    ec2t_jax.statistics(state, {'b': params['b']})


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match=r'eps must be >= 0, got -1'):
    baselines.absmean_ternary(MASK, eps=-1.0)
  tx = baselines.absmean_ternary_training()
  with pytest.raises(ValueError, match=r'only floating-point leaves'):
    tx.init({'i': jnp.arange(3)})
  with pytest.raises(ValueError, match=r'ternary_mask selects no parameter'):
    baselines.absmean_ternary({'k': False}).init({'k': jnp.asarray(W)})
  with pytest.raises(ValueError, match=r'needs the current params'):
    tx.update({'k': jnp.asarray(W)}, tx.init({'k': jnp.asarray(W)}))


def test_public_api():
  assert ec2t_jax.absmean_ternary is baselines.absmean_ternary
  assert isinstance(
    ec2t_jax.baselines.absmean_ternary(MASK).init(_weights()).inner_states['ternary'].inner_state,
    baselines.AbsmeanTernaryTrainingState,
  )


# --- config.method ------------------------------------------------------------------------


def test_unknown_method_is_refused_naming_the_valid_ones(tiny_mnist):
  with pytest.raises(ValueError, match=r"unknown config.method 'bitnet'; valid: 'ec2t', 'absmean'"):
    train.validate_config(tiny_mnist(method='bitnet'))


def test_absmean_refuses_pruning(tmp_path, tiny_mnist):
  config = tiny_mnist(method='absmean', **{'ec2t.prune_pattern': 'fc1/kernel'})
  with pytest.raises(ValueError, match=r"config.method='absmean' ternarizes only"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  config = tiny_mnist(method='absmean')
  config.stages = ml_collections.ConfigDict(
    {'p': {'kind': 'ecp', 'num_epochs': 1, 'prune_pattern': 'fc1/kernel'}}
  )
  config.stage_order = 'p'
  with pytest.raises(ValueError, match=r"config.stages.p: an ecp stage .* config.method='ec2t'"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_absmean_optimizer_from_config(tiny_mnist):
  cfg = tiny_mnist().ec2t
  params = _weights()
  tx = setup_lib.create_ec2t_optimizer(cfg, MASK, None, 10, method='absmean')
  assert baselines.states(tx.init(params))
  with pytest.raises(ValueError, match=r"unknown config.method 'x'; valid: 'ec2t', 'absmean'"):
    setup_lib.create_ec2t_optimizer(cfg, MASK, None, 10, method='x')


@pytest.mark.slow
def test_absmean_run_trains_exports_and_reports_like_ec2t(tmp_path, tiny_mnist):
  workdir = str(tmp_path / 'run')
  summary = train.train_and_evaluate(tiny_mnist(method='absmean'), workdir)
  assert summary['method'] == 'absmean' and summary['gamma'] is None
  assert summary['steps'] == 9 and 0 <= summary['test_accuracy'] <= 1
  # The trainer's statistics (from the state) agree with the sparsity of the params.
  assert summary['ec2t/total_sparsity'] == pytest.approx(summary['sparsity'], abs=1e-6)
  assert 0.05 < summary['sparsity'] < 0.6  # Rounding alone: about a third of the weights.
  run = workdir_lib.load_workdir(workdir)
  tern = {'conv1/kernel', 'conv2/kernel', 'fc1/kernel', 'fc2/kernel'}
  assert tree_util.selected_names(run.ternary_mask) == tern
  params = dict(tree_util.named_leaves(run.variables['params']))
  for name in tern:
    assert np.unique(np.asarray(params[name])).size <= 3
    _assert_symmetric_ternary(params[name])
  assert export.ternary_leaves(run.variables, run.opt_state) == {f'params/{n}' for n in tern}
  out = str(tmp_path / 'net.ec2t')
  assert export.main(['--workdir', workdir, '--out', out, '--entropy-coding']) == 0
  loaded = export.load(out)
  flat = dict(tree_util.named_leaves(loaded['params']))
  np.testing.assert_array_equal(flat['fc1/kernel'], params['fc1/kernel'])
  assert os.path.getsize(out) < 0.15 * sum(np.asarray(v).nbytes for v in params.values())
