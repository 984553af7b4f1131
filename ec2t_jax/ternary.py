"""Pure per-array math of Entropy-Constrained Trained Ternarization (EC2T).

Every function here works on one kernel (any shape) and its scalars, uses only
`jax.numpy`/`jax.lax`, and never branches in Python on numeric values, so it can
run under `jit`, `vmap`, `grad` and `optax.inject_hyperparams`. The optimizer in
`ec2t_jax.transforms` maps these functions over the leaves of a params pytree.

Conventions (docs/algorithm.md §0): an assignment `a` is an int8 array with values
0 → `-w_n`, 1 → `0`, 2 → `+w_p`. Centroids are carried as a float32 vector
`c = [w_p, w_n]` of magnitudes (both >= 0).

Reference: Marban, Becking, Wiedemann, Samek, "Learning Sparse & Ternary Neural
Networks with Entropy-Constrained Trained Ternarization (EC2T)", CVPR Workshops
2020, arXiv:2004.01077.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG, ZERO, POS = 0, 1, 2
ASSIGNMENT_DTYPE = jnp.int8


class Assignment(NamedTuple):
  """Result of an entropy-constrained assignment of one kernel.

  Attributes:
    assignment: int8 array, the kernel's shape, values in {0, 1, 2}.
    pmf: float32 (3,), cluster probabilities `(P_n, P_0, P_p)` after the floor.
    information: float32 (3,), `-log2 pmf` in bits.
    lam: float32 scalar, the Lagrange multiplier `λ_l` actually used.
  """

  assignment: jax.Array
  pmf: jax.Array
  information: jax.Array
  lam: jax.Array


def _f32(x: jax.typing.ArrayLike) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def levels(centroids: jax.typing.ArrayLike) -> jax.Array:
  """Returns the three cluster values `(-w_n, 0, +w_p)` of `centroids = [w_p, w_n]`."""
  c = _f32(centroids)
  return jnp.stack([-c[1], jnp.zeros_like(c[0]), c[0]])


def distances(w: jax.typing.ArrayLike, centroids: jax.typing.ArrayLike) -> jax.Array:
  """Squared distance of every weight to the three levels.

  Args:
    w: latent weights, any shape.
    centroids: `[w_p, w_n]`.

  Returns:
    float32 array of shape `(3,) + w.shape`: `D_c = (w - c)^2` for
    `c ∈ (-w_n, 0, +w_p)`.
  """
  w = _f32(w)
  lv = levels(centroids).reshape((3,) + (1,) * w.ndim)
  return jnp.square(w[None] - lv)


def argmin3(costs: jax.Array) -> jax.Array:
  """Index of the smallest of three costs along axis 0; ties go to the lowest index.

  Written as two comparisons rather than `jnp.argmin` so that ties are resolved
  exactly as the original (first minimum) and the result is int8 without an
  int32 intermediate of the kernel's size.
  """
  c0, c1, c2 = costs[0], costs[1], costs[2]
  best01 = jnp.where(c1 < c0, ZERO, NEG).astype(ASSIGNMENT_DTYPE)
  min01 = jnp.minimum(c0, c1)
  return jnp.where(c2 < min01, jnp.asarray(POS, ASSIGNMENT_DTYPE), best01)


def nearest(w: jax.typing.ArrayLike, centroids: jax.typing.ArrayLike) -> jax.Array:
  """Plain nearest-neighbour assignment (docs/algorithm.md §2.3, and `γ = 0`).

  Example:
    >>> nearest(jnp.array([-0.3, 0.01, 0.2]), jnp.array([0.2, 0.3]))
    Array([0, 1, 2], dtype=int8)
  """
  return argmin3(distances(w, centroids))


def counts(assignment: jax.Array) -> jax.Array:
  """Number of elements in each cluster, float32 `(3,)`."""
  return jnp.stack([jnp.sum(assignment == k, dtype=jnp.float32) for k in (NEG, ZERO, POS)])


def cluster_pmf(
  assignment: jax.Array,
  *,
  p0_min: jax.typing.ArrayLike = 0.5,
  reference_parity: bool = False,
) -> jax.Array:
  """Cluster probabilities with the sparsity floor (docs/algorithm.md §4.3–4.4).

  An empty cluster counts as one element. If `P_0 < p0_min`, with
  `D = p0_min - P_0` the missing mass is taken from the other two clusters in
  proportion to their size and `P_0 ← p0_min`:

    P_n ← P_n - P_n / (P_n + P_p) · D
    P_p ← P_p - P_p / (P_n + P_p) · D

  The original computes the second line with the *already reduced* `P_n`, so the
  result no longer sums to one; `reference_parity=True` reproduces that.

  Args:
    assignment: preliminary (nearest-neighbour) assignment, int8.
    p0_min: the floor of the zero cluster's probability.
    reference_parity: reproduce the original's arithmetic.

  Returns:
    float32 `(3,)` probabilities `(P_n, P_0, P_p)`.
  """
  return pmf_from_counts(
    counts(assignment), assignment.size, p0_min=p0_min, reference_parity=reference_parity
  )


def pmf_from_counts(
  cluster_counts: jax.Array,
  size: jax.typing.ArrayLike,
  *,
  p0_min: jax.typing.ArrayLike = 0.5,
  reference_parity: bool = False,
) -> jax.Array:
  """`cluster_pmf` from the cluster counts: the probabilities of many layers at once.

  Args:
    cluster_counts: `(..., 3)` counts of `(-w_n, 0, +w_p)` per layer.
    size: `(...)` element count of each layer.
    p0_min: the floor of the zero cluster's probability.
    reference_parity: reproduce the original's arithmetic (see `cluster_pmf`).

  Returns:
    float32 `(..., 3)` probabilities `(P_n, P_0, P_p)`.
  """
  n = _f32(size)
  cnt = jnp.maximum(_f32(cluster_counts), 1.0)
  p_n, p_0, p_p = cnt[..., 0] / n, cnt[..., 1] / n, cnt[..., 2] / n
  p0_min = _f32(p0_min)
  deficit = p0_min - p_0
  new_n = p_n - p_n / (p_n + p_p) * deficit
  p_n_for_p = new_n if reference_parity else p_n
  new_p = p_p - p_p / (p_n_for_p + p_p) * deficit
  floored = deficit > 0
  # Guard: the floor may not drive a cluster to zero or below (p0_min close to 1).
  tiny = 1.0 / n
  new_n = jnp.maximum(new_n, tiny)
  new_p = jnp.maximum(new_p, tiny)
  return jnp.stack(
    [
      jnp.where(floored, new_n, p_n),
      jnp.where(floored, p0_min, p_0),
      jnp.where(floored, new_p, p_p),
    ],
    axis=-1,
  )


def information(pmf: jax.Array) -> jax.Array:
  """Information content `I_c = -log2 P_c` in bits (finite for `P_c > 0`)."""
  return -jnp.log2(jnp.maximum(pmf, jnp.finfo(jnp.float32).tiny))


def lambda_max(
  w: jax.typing.ArrayLike, centroids: jax.typing.ArrayLike, info: jax.Array
) -> jax.Array:
  """The λ at which the most extreme weight of one side would move to zero (docs/algorithm.md §4.6).

    Λ_n = w_n (2 m_n - w_n) / (I_n - I_0),   Λ_p = w_p (2 m_p - w_p) / (I_p - I_0),
    Λ_max = min(Λ_n, Λ_p),  m_n = |min W|, m_p = |max W|.

  Guards the cases the original does not: a side whose information does not
  exceed the zero cluster's (`I_side <= I_0`, division by zero or a negative
  ratio) can never be pushed to zero and gives `+inf`; a centroid larger than
  twice the extreme weight gives a negative numerator and is clamped to 0; if
  both sides are `+inf` the result is 0 (no entropy constraint is possible).

  Returns:
    float32 scalar, finite and >= 0.
  """
  w = _f32(w)
  return lambda_max_from_extremes(jnp.min(w), jnp.max(w), centroids, info)


def lambda_max_from_extremes(
  w_min: jax.typing.ArrayLike,
  w_max: jax.typing.ArrayLike,
  centroids: jax.typing.ArrayLike,
  info: jax.Array,
) -> jax.Array:
  """`lambda_max` from each layer's extreme weights: many layers at once.

  Args:
    w_min: `(...)` smallest latent weight of each layer.
    w_max: `(...)` largest latent weight of each layer.
    centroids: `(..., 2)` `[w_p, w_n]`.
    info: `(..., 3)` information contents `I`.

  Returns:
    float32 `(...)`, finite and >= 0 (see `lambda_max` for the guards).
  """
  c = _f32(centroids)
  m_n = jnp.abs(_f32(w_min))
  m_p = jnp.abs(_f32(w_max))

  def side(wc, m, i_side):
    num = jnp.maximum(wc * (2.0 * m - wc), 0.0)
    den = i_side - info[..., 1]
    safe = jnp.where(den > 0, den, 1.0)
    return jnp.where(den > 0, num / safe, jnp.inf)

  lam = jnp.minimum(side(c[..., 1], m_n, info[..., 0]), side(c[..., 0], m_p, info[..., 2]))
  return jnp.where(jnp.isfinite(lam), lam, 0.0)


def layer_weight(
  size: int, max_size: int, sustain: jax.typing.ArrayLike = 0.05
) -> jax.typing.ArrayLike:
  """Per-layer scaling `δ_l = (N_l / N_max + ς) / (1 + ς)` (docs/algorithm.md §4.7).

  `size` and `max_size` are static element counts; `sustain` may be traced.
  """
  return (size / max_size + sustain) / (1.0 + sustain)


def assign(
  w: jax.typing.ArrayLike,
  centroids: jax.typing.ArrayLike,
  *,
  gamma: jax.typing.ArrayLike,
  delta: jax.typing.ArrayLike = 1.0,
  p0_min: jax.typing.ArrayLike = 0.5,
  reference_parity: bool = False,
) -> Assignment:
  """Entropy-constrained assignment of one kernel (docs/algorithm.md §4).

    a = argmin_c (W - c)^2 + λ_l · I_c,   λ_l = γ · δ_l · Λ_max

  where `I` comes from the floored probabilities of the nearest-neighbour
  assignment. `gamma = 0` is plain nearest neighbour.

  Args:
    w: latent weights, any shape.
    centroids: `[w_p, w_n]` (magnitudes).
    gamma: global entropy gain `γ >= 0`.
    delta: per-layer scaling `δ_l` (see `layer_weight`).
    p0_min: floor of the zero cluster's probability.
    reference_parity: reproduce the original's probability arithmetic.

  Returns:
    An `Assignment`. Never NaN or inf, whatever the inputs' degeneracy.

  Example (docs/algorithm.md §7):
    >>> w = jnp.array([-.9, -.5, -.31, -.2, -.05, 0., .02, .1, .18, .3, .45, 1.2])
    >>> assign(w, jnp.array([.36, .27]), gamma=.15, reference_parity=True).assignment
    Array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2], dtype=int8)
  """
  d = distances(w, centroids)
  pre = argmin3(d)
  pmf = cluster_pmf(pre, p0_min=p0_min, reference_parity=reference_parity)
  info = information(pmf)
  lam = multiplier(gamma, delta, lambda_max(w, centroids, info))
  costs = d + lam * info.reshape((3,) + (1,) * (d.ndim - 1))
  return Assignment(argmin3(costs), pmf, info, lam)


def multiplier(
  gamma: jax.typing.ArrayLike, delta: jax.typing.ArrayLike, lam_max: jax.Array
) -> jax.Array:
  """`λ_l = γ·δ_l·Λ_max` (docs/algorithm.md §4.8), kept finite (any shape)."""
  lam = _f32(gamma) * _f32(delta) * lam_max
  # A huge gamma may overflow λ; keep it finite so that λ·I never becomes NaN.
  return jnp.minimum(jnp.nan_to_num(lam, nan=0.0), jnp.finfo(jnp.float32).max)


def ternary_kernel(
  assignment: jax.Array, centroids: jax.typing.ArrayLike, dtype: jax.typing.DTypeLike
) -> jax.Array:
  """The ternary kernel `q = w_p·[a==2] − w_n·[a==0]` in `dtype`."""
  c = jnp.asarray(centroids).astype(dtype)
  zero = jnp.zeros((), dtype)
  return jnp.where(assignment == POS, c[0], jnp.where(assignment == NEG, -c[1], zero))


def pruned_kernel(assignment: jax.Array, w: jax.Array, dtype: jax.typing.DTypeLike) -> jax.Array:
  """The ECP kernel `q = (A + B)·W`: latent values where kept, exact zeros where pruned."""
  return jnp.where(assignment == ZERO, jnp.zeros((), dtype), w.astype(dtype))


def map_gradient(
  grad: jax.Array,
  assignment: jax.Array,
  centroids: jax.typing.ArrayLike,
  *,
  reference_parity: bool = False,
  prune: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Maps `G = ∂L/∂q` to the latent weights and the two centroids (docs/algorithm.md §3.3).

    ∂W   = w_p·A·G + w_n·B·G + Z·G      (TTQ-style scaled straight-through)
    g_wp = Σ A·G
    g_wn = −Σ B·G                       (the derivative w.r.t. the magnitude w_n)

  With `reference_parity=True`, `g_wn = +Σ B·G` (the original's sign error) and
  pruned layers scale their latent gradient by the centroids as the original
  does; otherwise a pruned layer's latent gradient is `G` itself (the true
  derivative of `q = (A + B)·W` on kept weights, straight-through on pruned).

  Args:
    grad: gradient w.r.t. the kernel used in the forward pass.
    assignment: the assignment that produced that kernel.
    centroids: the `[w_p, w_n]` that produced that kernel.
    reference_parity: reproduce the original's quirks.
    prune: the layer is entropy-constrained pruned (ECP) rather than ternary.

  Returns:
    `(latent_grad, centroid_grad)`: latent_grad in float32 with `grad`'s shape,
    centroid_grad float32 `(2,)` = `[g_wp, g_wn]`.

  Example (docs/algorithm.md §7):
    >>> g = jnp.array([.1, -.2, .3, -.05, -.4, .02])
    >>> a = jnp.array([0, 1, 2, 2, 0, 1], jnp.int8)
    >>> map_gradient(g, a, jnp.array([.36, .27]))[1]
    Array([0.25, 0.3 ], dtype=float32)
  """
  g = _f32(grad)
  c = _f32(centroids)
  is_pos = assignment == POS
  is_neg = assignment == NEG
  g_wp = jnp.sum(jnp.where(is_pos, g, 0.0))
  sum_neg = jnp.sum(jnp.where(is_neg, g, 0.0))
  g_wn = sum_neg if reference_parity else -sum_neg
  if prune and not reference_parity:
    latent = g
  else:
    latent = jnp.where(is_pos, c[0] * g, jnp.where(is_neg, c[1] * g, g))
  return latent, jnp.stack([g_wp, g_wn])


def centroid_floor(w: jax.typing.ArrayLike, factor: jax.typing.ArrayLike = 0.675) -> jax.Array:
  """Lower bound of both centroids: `factor · std(W)` with the unbiased (N−1) estimator.

  A one-element kernel has no spread and gives 0 rather than NaN.
  """
  w = _f32(w)
  if w.size < 2:
    return jnp.zeros((), jnp.float32)
  mean = jnp.mean(w)
  return floor_from_deviations(jnp.sum(jnp.square(w - mean)), w.size, factor)


def floor_from_deviations(
  squared_deviations: jax.typing.ArrayLike,
  size: jax.typing.ArrayLike,
  factor: jax.typing.ArrayLike = 0.675,
) -> jax.Array:
  """`centroid_floor` from `Σ (W − mean W)²` and the element count (any shape).

  A layer of fewer than two elements gives 0.
  """
  n = _f32(size)
  var = _f32(squared_deviations) / jnp.maximum(n - 1.0, 1.0)
  return jnp.where(n < 2, 0.0, _f32(factor) * jnp.sqrt(var))


def initial_centroids(w: jax.typing.ArrayLike, scale: jax.typing.ArrayLike) -> jax.Array:
  """`[w_p, w_n] = s·[|max W|, |min W|]` (docs/algorithm.md §2.2), float32."""
  w = _f32(w)
  return centroids_from_extremes(jnp.min(w), jnp.max(w), scale)


def centroids_from_extremes(
  w_min: jax.typing.ArrayLike, w_max: jax.typing.ArrayLike, scale: jax.typing.ArrayLike
) -> jax.Array:
  """`initial_centroids` from each layer's extreme weights: float32 `(..., 2)`."""
  s = _f32(scale)
  return jnp.stack([s * jnp.abs(_f32(w_max)), s * jnp.abs(_f32(w_min))], axis=-1)


def snap_centroids(centroids: jax.typing.ArrayLike, dtype: jax.typing.DTypeLike) -> jax.Array:
  """Rounds both centroids to a common grid so ternary params stay exact.

  optax applies updates additively (`p + u`). When an element moves from one
  level to another, `p + (q_new - p)` equals `q_new` in floating point only if
  both levels lie on a grid fine enough to be exact and coarse enough that
  their sums and differences are representable. Rounding `w_p` and `w_n` to
  multiples of `4·ulp(max(w_p, w_n))` in `dtype` guarantees this (also when the
  larger centroid crosses a power of two between two steps). The change is at
  most `2·ulp` of the larger centroid: 2^-22 relative in float32. The
  unrounded values keep training in the optimizer state; this function only
  defines the levels placed in the network.

  Args:
    centroids: `[w_p, w_n]` >= 0, float32; or `(..., 2)`, one pair per layer.
    dtype: the dtype of the params leaf.

  Returns:
    float32, `centroids`' shape, exactly representable in `dtype`.
  """
  c = _f32(centroids)
  info = jnp.finfo(dtype)
  m = jnp.maximum(jnp.max(c, axis=-1, keepdims=True), info.tiny)
  _, e = jnp.frexp(m)  # m = f·2^e, f in [0.5, 1): ulp(m) = 2^(e - 1 - nmant)
  exponent = jnp.maximum(e - 1 - info.nmant + 2, info.minexp)
  grid = jnp.ldexp(jnp.float32(1.0), exponent)
  snapped = jnp.round(c / grid) * grid
  # Saturate rather than overflow to inf in narrow dtypes.
  return jnp.minimum(snapped, jnp.float32(info.max))


def exact_update(param: jax.Array, target: jax.Array) -> jax.Array:
  """The additive update `u` with `param + u == target` in `param.dtype`, when one exists.

  `u = target - param` is corrected once by the residual of the rounded sum, and
  then by one unit in the last place in either direction; the first candidate
  that lands exactly on the target is used (see `snap_centroids` for why one
  always exists for ternary levels).
  """
  dtype = param.dtype
  target = target.astype(dtype)
  u0 = target - param
  r0 = param + u0
  u1 = u0 + (target - r0)
  r1 = param + u1
  u2 = jnp.nextafter(u1, jnp.asarray(jnp.inf, dtype))
  u3 = jnp.nextafter(u1, jnp.asarray(-jnp.inf, dtype))
  return jnp.where(
    r0 == target,
    u0,
    jnp.where(r1 == target, u1, jnp.where(param + u2 == target, u2, u3)),
  )


def entropy_bits(pmf: jax.Array) -> jax.Array:
  """Shannon entropy `H(P) = -Σ P log2 P` of a probability vector, in bits."""
  p = jnp.clip(pmf, 0.0, 1.0)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log2(jnp.maximum(p, 1e-30)), 0.0))
