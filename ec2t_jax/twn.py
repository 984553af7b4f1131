"""Ternary Weight Networks (TWN) as a compression method: `config.method = 'twn'`.

Per layer, with `W` the latent full-precision weights:

    Δ = 0.7 · mean|W|                        (the threshold)
    α = mean of |W_i| over |W_i| > Δ         (the scale; 0 if no weight exceeds Δ)
    q = α · sign(W) · [|W| > Δ]              (the ternary kernel)

trained straight through: the gradient w.r.t. `q` steps `W` unchanged (Adam),
and the params leaf holds `q` exactly. `twn_ternary(...)` is a drop-in
replacement for `ec2t_jax.ec2t(...)` and `ec2t_jax.baselines.absmean_ternary(
...)`, and `TWN` its entry in `ec2t_jax.methods`.

Reference: Li & Liu, "Ternary Weight Networks", 2016, arXiv:1605.04711.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ec2t_jax import alias, baselines, methods, ternary
from ec2t_jax import masks as masks_lib

__all__ = [
  'THRESHOLD_FACTOR',
  'TWN',
  'TwnTrainingState',
  'is_twn_state',
  'states',
  'twn_assignment',
  'twn_quantize',
  'twn_scale',
  'twn_ternary',
  'twn_ternary_training',
  'twn_threshold',
]

# Δ = THRESHOLD_FACTOR · mean|W|: the paper's approximation of the optimal threshold for
# uniformly or normally distributed weights.
THRESHOLD_FACTOR = 0.7


def twn_threshold(w: jax.typing.ArrayLike) -> jax.Array:
  """The threshold `Δ = 0.7 · mean|W|` of one leaf, float32.

  Example:
    >>> float(twn_threshold(jnp.array([0.5, -1.0, 0.25, 0.25])))  # 0.7 · 0.5
    0.3499999940395355
  """
  w = jnp.asarray(w, jnp.float32)
  return jnp.float32(THRESHOLD_FACTOR) * jnp.mean(jnp.abs(w))


def twn_scale(w: jax.typing.ArrayLike, dtype: jax.typing.DTypeLike = jnp.float32) -> jax.Array:
  """The scale `α` of one leaf, float32, on the grid of `ternary.snap_centroids` for `dtype`.

  `α` is the mean of `|W|` over the weights with `|W| > Δ` (0 if there are
  none). Rounding it to a multiple of `4·ulp(α)` in `dtype` keeps the ternary
  params exact under `optax.apply_updates`, as for EC2T's centroids; pass the
  params leaf's dtype (the level of a bfloat16 network is coarser).

  Example:
    >>> float(twn_scale(jnp.array([0.5, -1.0, 0.25, 0.25])))  # Δ = 0.35: mean(0.5, 1.0)
    0.75
  """
  a = jnp.abs(jnp.asarray(w, jnp.float32))
  kept = a > twn_threshold(a)
  count = jnp.sum(kept, dtype=jnp.float32)
  alpha = jnp.sum(jnp.where(kept, a, 0.0)) / jnp.maximum(count, 1.0)
  return ternary.snap_centroids(jnp.stack([alpha, alpha]), dtype)[0]


def twn_quantize(w: jax.typing.ArrayLike, dtype: jax.typing.DTypeLike = None) -> jax.Array:
  """TWN's ternarization of one leaf: `α · sign(W) · [|W| > Δ]`, values in `{-α, 0, +α}`.

  `α` as `twn_scale` rounds it; zeros are +0.0 (never -0.0, which the export
  format refuses).

  Args:
    w: the latent weights of one leaf.
    dtype: the dtype of the result (and of the grid `α` lies on); None: `w`'s.

  Returns:
    The kernel, shaped like `w`.

  Example:
    >>> twn_quantize(jnp.array([0.5, -1.0, 0.25, 0.25])).tolist()
    [0.75, -0.75, 0.0, 0.0]
  """
  dtype = jnp.result_type(w) if dtype is None else dtype
  w = jnp.asarray(w, jnp.float32)
  alpha = twn_scale(w, dtype)
  q = jnp.where(jnp.abs(w) > twn_threshold(w), jnp.sign(w) * alpha, 0.0)
  return jnp.where(q == 0, 0.0, q).astype(dtype)  # -0.0 (a negative W with α = 0) → +0.0.


def twn_assignment(w: jax.typing.ArrayLike, dtype: jax.typing.DTypeLike = jnp.float32) -> jax.Array:
  """int8 symbols of `twn_quantize(w, dtype)` in EC2T's convention: 0 → -α, 1 → 0, 2 → +α."""
  return (jnp.sign(twn_quantize(w, dtype)) + 1).astype(jnp.int8)


class TwnTrainingState(NamedTuple):
  """State of `twn_ternary_training`.

  Attributes:
    latent: float32 full-precision latent weights `W`, params-shaped
      (`optax.MaskedNode` where another transformation owns the leaf).
    latent_opt_state: state of the latent-weight optimizer.
  """

  latent: Any
  latent_opt_state: optax.OptState


def is_twn_state(x: Any) -> bool:
  """True for the state of `twn_ternary_training`."""
  return isinstance(x, TwnTrainingState)


def _quantize(state: TwnTrainingState, w: jax.Array, dtype: jax.typing.DTypeLike) -> jax.Array:
  """`twn_quantize` as a `baselines.Quantizer` (TWN has no setting in its state)."""
  del state
  return twn_quantize(w, dtype)


def _scale(state: TwnTrainingState, w: jax.Array, dtype: jax.typing.DTypeLike) -> jax.Array:
  """`twn_scale` as a `baselines.Quantizer`."""
  del state
  return twn_scale(w, dtype)


def twn_ternary_training(
  *, latent_optimizer: optax.GradientTransformation | None = None
) -> optax.GradientTransformation:
  """Trains every leaf it is given into a TWN kernel (straight-through estimator).

  One update, with `G = ∂L/∂q` the gradient w.r.t. the params leaf `q = Q(W)`:

      W ← W + latent_optimizer(G)      (STE: ∂q/∂W taken as the identity)
      q ← Q(W) = α · sign(W) · [|W| > Δ],   Δ = 0.7·mean|W|,  α = mean_{|W|>Δ} |W|

  and the returned update turns each params leaf into the new `Q(W)` exactly
  under `optax.apply_updates`. A gradient with a NaN or inf leaves the latent
  weights and their optimizer as they were (a zero update). `init` copies the
  params (as float32) into the latent weights; call `ec2t_jax.ternarize(params,
  opt_state)` once after it so the network starts ternary.

  Use it under `optax.partition` so that it sees only the leaves to ternarize,
  or call `twn_ternary`, which does that.

  Args:
    latent_optimizer: optimizer of the latent weights (default Adam, 1e-4).

  Returns:
    An `optax.GradientTransformation` whose state is a `TwnTrainingState`.

  Raises:
    ValueError: at `init`, for a leaf that is not floating point.

  Example:
    >>> params = {'kernel': jnp.array([0.5, -1.0, 0.25, 0.25])}
    >>> state = twn_ternary_training().init(params)
    >>> ec2t_jax.ternarize(params, state)['kernel'].tolist()
    [0.75, -0.75, 0.0, 0.0]
  """
  return baselines.straight_through_training(
    'twn_ternary_training', _quantize, TwnTrainingState, latent_optimizer or optax.adam(1e-4)
  )


def twn_ternary(
  ternary_mask: masks_lib.MaskOrFn,
  *,
  latent_optimizer: optax.GradientTransformation | None = None,
  fp_optimizer: optax.GradientTransformation | None = None,
  fixed_mask: masks_lib.MaskOrFn | None = None,
) -> optax.GradientTransformation:
  """Ternary Weight Networks as one optax optimizer, shaped like `ec2t`.

  The ternary leaves get `twn_ternary_training` (latent weights `W` in the
  state; the params hold `α·sign(W)·[|W| > Δ]` per leaf, gradients applied to
  `W` straight through), the others `fp_optimizer`; `fixed_mask` leaves and
  integer leaves get zero updates. Call `ec2t_jax.ternarize(params,
  opt_state)` once after `init`; from then on the params stay exactly ternary.

  Differences from EC2T: one symmetric level `±α` per layer from a fixed
  threshold rule instead of two trained centroids; no entropy term (the
  sparsity is whatever `Δ = 0.7·mean|W|` gives, about 42% of a Gaussian
  layer's weights) and no frozen phase.

  Reference: Li & Liu, "Ternary Weight Networks", 2016, arXiv:1605.04711.

  Args:
    ternary_mask: pytree of bools (or `params -> pytree of bools`) selecting the
      leaves to ternarize; see `ec2t_jax.masks.default_ternary_mask`.
    latent_optimizer: optimizer of the latent weights (default Adam, 1e-4).
    fp_optimizer: optimizer of all other float params (default
      `ec2t_jax.default_fp_optimizer()`).
    fixed_mask: leaves held exactly as they are (zero updates, no state).

  Returns:
    An `optax.GradientTransformation`; its state holds one `TwnTrainingState`.

  Raises:
    ValueError: at `init`, for masks that select nothing, overlap, or select
      non-float leaves.

  Example:
    >>> params = {'dense': {'kernel': jnp.array([[0.5, -1.0], [0.25, 0.25]]),
    ...                     'bias': jnp.zeros(2)}}
    >>> tx = twn_ternary({'dense': {'kernel': True, 'bias': False}})
    >>> params = ec2t_jax.ternarize(params, tx.init(params))
    >>> params['dense']['kernel'].tolist()
    [[0.75, -0.75], [0.0, 0.0]]
  """
  return alias.compression_partition(
    ternary_mask,
    twn_ternary_training(latent_optimizer=latent_optimizer),
    fp_optimizer or alias.default_fp_optimizer(),
    fixed_mask=fixed_mask,
    check_fp_dtypes=fp_optimizer is None,
  )


def states(opt_state: optax.OptState) -> list[TwnTrainingState]:
  """All `TwnTrainingState` inside `opt_state`."""
  return methods.states_of(opt_state, is_twn_state)


TWN = baselines.latent_method('twn', twn_ternary, is_twn_state, _quantize, _scale)
