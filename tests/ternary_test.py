"""Tests of the per-array EC2T math: golden numbers (docs/algorithm.md §7) and robust numerics."""

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as reference
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ec2t_jax import ternary

GOLDEN_W = np.array(
  [-0.9, -0.5, -0.31, -0.2, -0.05, 0.0, 0.02, 0.1, 0.18, 0.3, 0.45, 1.2], np.float32
)


def test_initial_centroids_golden():
  np.testing.assert_allclose(ternary.initial_centroids(GOLDEN_W, 0.3), [0.36, 0.27], rtol=1e-5)


def test_nearest_golden():
  a = ternary.nearest(GOLDEN_W, jnp.array([0.36, 0.27]))
  np.testing.assert_array_equal(a, [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2])
  assert a.dtype == jnp.int8


def test_nearest_ties_go_to_lowest_index():
  # 0.1 is exactly between 0 and w_p = 0.2; -0.1 exactly between -w_n = -0.2 and 0.
  a = ternary.nearest(jnp.array([0.125, -0.125]), jnp.array([0.25, 0.25]))
  np.testing.assert_array_equal(a, [1, 0])


@pytest.mark.parametrize(
  'parity, expected_pmf',
  [(True, [0.2857143, 0.5, 0.2111111]), (False, [0.2857143, 0.5, 0.2142857])],
)
def test_assign_golden(parity, expected_pmf):
  res = ternary.assign(
    GOLDEN_W, jnp.array([0.36, 0.27]), gamma=0.15, delta=1.0, reference_parity=parity
  )
  np.testing.assert_allclose(res.pmf, expected_pmf, rtol=1e-5)
  if parity:
    np.testing.assert_allclose(res.information, [1.8073548, 1.0, 2.2439256], rtol=1e-5)
    np.testing.assert_allclose(res.lam, 0.07675064, rtol=1e-5)
  np.testing.assert_array_equal(res.assignment, [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2])
  q = ternary.ternary_kernel(res.assignment, jnp.array([0.36, 0.27]), jnp.float32)
  np.testing.assert_allclose(q, [-0.27] * 3 + [0] * 7 + [0.36] * 2, rtol=1e-6)


def test_lambda_max_golden():
  info = jnp.array([1.8073548, 1.0, 2.2439256])
  # Λ_n = 0.5116709, Λ_p = 0.590389 → Λ_max = Λ_n.
  np.testing.assert_allclose(
    ternary.lambda_max(GOLDEN_W, jnp.array([0.36, 0.27]), info), 0.5116709, rtol=1e-5
  )


def test_floor_quirk_golden():
  a = jnp.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2], jnp.int8)
  parity = ternary.cluster_pmf(a, reference_parity=True)
  correct = ternary.cluster_pmf(a, reference_parity=False)
  np.testing.assert_allclose(parity, [0.1875, 0.5, 0.28181815], rtol=1e-5)
  np.testing.assert_allclose(float(jnp.sum(parity)), 0.9693, atol=1e-4)
  np.testing.assert_allclose(correct, [0.1875, 0.5, 0.3125], rtol=1e-5)
  np.testing.assert_allclose(float(jnp.sum(correct)), 1.0, rtol=1e-5)


def test_empty_cluster_counts_as_one():
  a = jnp.array([1, 1, 1, 2], jnp.int8)  # no negatives
  np.testing.assert_allclose(ternary.cluster_pmf(a), [0.25, 0.75, 0.25])


@pytest.mark.parametrize('parity, g_wn', [(True, -0.30), (False, 0.30)])
def test_gradient_golden(parity, g_wn):
  a = jnp.array([0, 1, 2, 2, 0, 1], jnp.int8)
  g = jnp.array([0.1, -0.2, 0.3, -0.05, -0.4, 0.02])
  d_w, g_c = ternary.map_gradient(g, a, jnp.array([0.36, 0.27]), reference_parity=parity)
  np.testing.assert_allclose(d_w, [0.027, -0.2, 0.108, -0.018, -0.108, 0.02], rtol=1e-5)
  np.testing.assert_allclose(g_c, [0.25, g_wn], rtol=1e-5)


def test_gradient_sign_is_the_true_derivative():
  """The default `g_wn` is ∂L/∂w_n of L = <G, q(w_p, w_n)> computed by autodiff."""
  a = jnp.array([0, 1, 2, 2, 0, 1], jnp.int8)
  g = jnp.array([0.1, -0.2, 0.3, -0.05, -0.4, 0.02])
  auto = jax.grad(lambda c: jnp.sum(g * ternary.ternary_kernel(a, c, jnp.float32)))(
    jnp.array([0.36, 0.27])
  )
  _, g_c = ternary.map_gradient(g, a, jnp.array([0.36, 0.27]))
  np.testing.assert_allclose(g_c, auto, rtol=1e-5)


def test_pruned_gradient_and_kernel():
  a = jnp.array([0, 1, 2], jnp.int8)
  w = jnp.array([-0.5, 0.01, 0.4])
  g = jnp.array([1.0, 2.0, 3.0])
  np.testing.assert_array_equal(
    ternary.pruned_kernel(a, w, jnp.float32), np.array([-0.5, 0.0, 0.4], np.float32)
  )
  d_w, _ = ternary.map_gradient(g, a, jnp.array([0.3, 0.2]), prune=True)
  np.testing.assert_allclose(d_w, g, rtol=1e-5)
  d_w, _ = ternary.map_gradient(g, a, jnp.array([0.3, 0.2]), prune=True, reference_parity=True)
  np.testing.assert_allclose(d_w, [0.2, 2.0, 0.9], rtol=1e-5)


def test_centroid_floor_unbiased_std():
  w = jnp.array([1.0, 2.0, 3.0, 4.0])
  np.testing.assert_allclose(
    ternary.centroid_floor(w), 0.675 * np.std([1, 2, 3, 4], ddof=1), rtol=1e-5
  )
  assert float(ternary.centroid_floor(jnp.array([3.0]))) == 0.0


def test_layer_weight():
  assert ternary.layer_weight(100, 100) == pytest.approx(1.0)
  assert ternary.layer_weight(50, 100, 0.05) == pytest.approx((0.5 + 0.05) / 1.05)


def test_gamma_zero_is_nearest_neighbour():
  w = jax.random.normal(jax.random.key(0), (64, 32))
  c = jnp.array([0.8, 1.1])
  np.testing.assert_array_equal(ternary.assign(w, c, gamma=0.0).assignment, ternary.nearest(w, c))


def test_larger_gamma_is_sparser():
  w = jax.random.normal(jax.random.key(1), (4096,))
  c = jnp.array([1.0, 1.0])
  zeros = [
    float(jnp.mean(ternary.assign(w, c, gamma=g).assignment == 1)) for g in (0.0, 0.2, 0.5, 1.0)
  ]
  assert zeros == sorted(zeros) and zeros[-1] > zeros[0]


# --- degenerate inputs: never NaN or inf -------------------------------------------------------


_assign = jax.jit(
  lambda w, c, gamma, parity: ternary.assign(w, c, gamma=gamma, reference_parity=parity),
  static_argnames='parity',
)


def _finite(res: ternary.Assignment):
  assert np.all(np.isfinite(res.pmf)) and np.all(np.isfinite(res.information))
  assert np.isfinite(float(res.lam)) and float(res.lam) >= 0
  assert set(np.unique(np.asarray(res.assignment)).tolist()) <= {0, 1, 2}


@pytest.mark.parametrize('parity', [False, True])
@pytest.mark.parametrize(
  'w, c',
  [
    (np.zeros((3, 3, 2, 2)), [0.0, 0.0]),  # all-zero layer, zero centroids
    (np.full((10,), 0.7), [0.21, 0.21]),  # constant layer
    (np.array([0.5]), [0.15, 0.15]),  # one element
    (np.array([-1.0, 1.0]), [0.3, 0.3]),  # empty zero cluster
    (np.array([-1.0, -0.9, 0.0, 0.01]), [0.9, 0.9]),  # P_n = P_0 = 0.5 → I_n = I_0
    (np.array([-0.1, 0.0, 0.1, 0.05]), [5.0, 5.0]),  # centroid > 2x extreme weight
  ],
)
@pytest.mark.parametrize('gamma', [0.0, 0.15, 1e6, 1e38])
def test_degenerate_layers_stay_finite(w, c, gamma, parity):
  res = _assign(jnp.asarray(w, jnp.float32), jnp.asarray(c), gamma, parity=parity)
  _finite(res)


def test_huge_gamma_may_zero_everything_without_nan():
  w = jax.random.normal(jax.random.key(2), (100,))
  res = ternary.assign(w, jnp.array([1.0, 1.0]), gamma=1e30)
  _finite(res)
  assert float(jnp.mean(res.assignment == 1)) > 0.9


# --- exactness of additive updates ------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=4)
def _switch(a_old, c_old, a_new, c_new, dtype):
  p = ternary.ternary_kernel(a_old, c_old, dtype)
  q = ternary.ternary_kernel(a_new, c_new, dtype)
  return p, q, p + ternary.exact_update(p, q)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_snapped_levels_are_reached_exactly(dtype):
  """Every switch between levels, including +w_p → -w_n, lands exactly under p + u."""
  rng = np.random.default_rng(0)
  for _ in range(300):
    scale = 10.0 ** rng.uniform(-6, 3)
    old = ternary.snap_centroids(jnp.asarray(rng.uniform(0.01, 1.0, 2) * scale), dtype)
    new = ternary.snap_centroids(old * jnp.asarray(rng.uniform(0.55, 1.9, 2)), dtype)
    a_old = jnp.asarray(rng.integers(0, 3, 64), jnp.int8)
    a_new = jnp.asarray(rng.integers(0, 3, 64), jnp.int8)
    p, q, reached = _switch(a_old, old, a_new, new, dtype)
    np.testing.assert_array_equal(np.asarray(reached), np.asarray(q))


def test_unsnapped_switch_would_leave_stray_values():
  """Why snapping exists: +w_p → -w_n is not always exact as q + (q_new - q)."""
  w_p, w_n = np.float32(0.40924042), np.float32(0.083489336)
  assert w_p + (-w_n - w_p) != -w_n  # the naive additive switch misses by one ulp
  c = ternary.snap_centroids(jnp.array([w_p, w_n]), jnp.float32)
  p, q = c[0][None], -c[1][None]
  np.testing.assert_array_equal(p + ternary.exact_update(p, q), q)
  np.testing.assert_allclose(c, [w_p, w_n], rtol=2**-21)


def test_snap_is_tiny_change_and_representable():
  c = jnp.array([0.36, 0.27])
  s = ternary.snap_centroids(c, jnp.float32)
  np.testing.assert_allclose(s, c, rtol=2**-21)
  sb = ternary.snap_centroids(c, jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(sb.astype(jnp.bfloat16).astype(jnp.float32)), sb)


def test_reference_numpy_matches_golden():
  a, lam = reference.assign(GOLDEN_W, np.array([0.36, 0.27], np.float32), 0.15, 1.0, 0.5, True)
  np.testing.assert_array_equal(a, [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2])
  np.testing.assert_allclose(lam, 0.07675064, rtol=1e-5)


# --- property-based ---------------------------------------------------------------------------

_SHAPES = [(1,), (7,), (3, 4), (2, 3, 2, 2)]
_floats = st.floats(min_value=-float(np.float32(1e30)), max_value=float(np.float32(1e30)), width=32)


@functools.partial(jax.jit, static_argnames=('parity', 'dtype'))
def _ternarize_once(w, scale, gamma, *, parity, dtype):
  """Init centroids, floor, snap, assign, build q: one jitted call per shape."""
  w = w.astype(dtype)
  c = ternary.initial_centroids(w, scale)
  c = jnp.maximum(c, ternary.centroid_floor(w))
  c = ternary.snap_centroids(c, dtype)
  res = ternary.assign(w, c, gamma=gamma, delta=0.5, reference_parity=parity)
  return c, res, ternary.ternary_kernel(res.assignment, c, dtype)


def _arrays(elements):
  return st.sampled_from(_SHAPES).flatmap(lambda s: hnp.arrays(np.float32, s, elements=elements))


@settings(max_examples=60, deadline=None)
@given(
  w=_arrays(_floats),
  scale=st.floats(min_value=1e-3, max_value=10.0),
  gamma=st.floats(min_value=0.0, max_value=1e3),
  parity=st.booleans(),
)
def test_property_assignment_is_finite_and_ternary(w, scale, gamma, parity):
  c, res, q = _ternarize_once(w, scale, gamma, parity=parity, dtype=jnp.float32)
  assert np.all(np.isfinite(np.asarray(c)))
  _finite(res)
  assert set(np.unique(np.asarray(q)).tolist()) <= {0.0, float(c[0]), -float(c[1])}


@settings(max_examples=40, deadline=None)
@given(
  w=_arrays(st.floats(-1e4, 1e4, allow_subnormal=True, width=32)),
  gamma=st.floats(min_value=0.0, max_value=10.0),
)
def test_property_bfloat16_kernels(w, gamma):
  c, res, q = _ternarize_once(w, 0.3, gamma, parity=False, dtype=jnp.bfloat16)
  _finite(res)
  assert q.dtype == jnp.bfloat16
  qf = np.asarray(q, np.float32)
  assert np.all(np.isfinite(qf))
  assert set(np.unique(qf).tolist()) <= {0.0, float(c[0]), -float(c[1])}
