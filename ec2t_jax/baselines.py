"""Baselines in the same framework as EC2T: BitNet b1.58's absmean ternarization.

`absmean_ternary(...)` is a drop-in replacement for `ec2t_jax.ec2t(...)`: the
same ternary mask, the same full-precision optimizer for the other leaves, and
a params pytree that *is* the ternary network, so the trainer, checkpoints,
export and report treat both alike (`config.method = 'absmean'`, see
docs/baselines.md).

The parts every latent-weight baseline shares live here too:
`straight_through_training` (latent weights in the state, a quantizer places
the kernel) and `latent_method` (its entry in `ec2t_jax.methods`);
`ec2t_jax.twn` is built from them.

Reference: Ma et al., "The Era of 1-bit LLMs: All Large Language Models are in
1.58 Bits", 2024, arXiv:2402.17764 (BitNet b1.58).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ec2t_jax import alias, methods, ternary, transforms, tree_util
from ec2t_jax import masks as masks_lib

__all__ = [
  'ABSMEAN',
  'LATENT_SETTINGS',
  'AbsmeanTernaryTrainingState',
  'absmean_assignment',
  'absmean_quantize',
  'absmean_scale',
  'absmean_ternary',
  'absmean_ternary_training',
  'is_absmean_state',
  'latent_method',
  'states',
  'straight_through_training',
]

# `quantize(state, w, dtype) -> q`: the kernel of the latent weights `w` (float32) of one
# leaf in `dtype`, with the state's settings (e.g. absmean's ε).
Quantizer = Callable[[Any, jax.Array, jax.typing.DTypeLike], jax.Array]


def absmean_scale(w: jax.typing.ArrayLike, dtype: jax.typing.DTypeLike = jnp.float32) -> jax.Array:
  """The level `m = mean|W|` of one leaf, float32, on the grid of `ternary.snap_centroids`.

  Rounding `m` to a multiple of `4·ulp(m)` in `dtype` (a change of at most
  2^-22 relative in float32) keeps the ternary params exact under
  `optax.apply_updates`, as for EC2T's centroids. Pass the params leaf's
  dtype: the level of a bfloat16 network is coarser than the float32 default.
  """
  m = jnp.mean(jnp.abs(jnp.asarray(w, jnp.float32)))
  return ternary.snap_centroids(jnp.stack([m, m]), dtype)[0]


def absmean_quantize(
  w: jax.typing.ArrayLike, eps: jax.typing.ArrayLike = 1e-5, dtype: jax.typing.DTypeLike = None
) -> jax.Array:
  """BitNet b1.58's absmean ternarization of one leaf: values in `{-m, 0, +m}`.

      m = mean|W|,   Q(W) = round(clip(W / (m + ε), -1, 1)) · m

  `m` as `absmean_scale` rounds it; zeros are +0.0 (never -0.0, which the
  export format refuses).

  Args:
    w: the latent weights of one leaf.
    eps: `ε >= 0`, keeps an all-zero leaf from dividing by zero.
    dtype: the dtype of the result (and of the grid `m` lies on); None: `w`'s.

  Returns:
    `Q(W)`, shaped like `w`.

  Example:
    >>> absmean_quantize(jnp.array([0.5, -1.0, 0.25, 0.25])).tolist()
    [0.5, -0.5, 0.0, 0.0]
  """
  dtype = jnp.result_type(w) if dtype is None else dtype
  w = jnp.asarray(w, jnp.float32)
  m = absmean_scale(w, dtype)
  r = jnp.round(jnp.clip(w / (m + jnp.asarray(eps, jnp.float32)), -1.0, 1.0))
  return jnp.where(r == 0, 0.0, r * m).astype(dtype)


def absmean_assignment(
  w: jax.typing.ArrayLike,
  eps: jax.typing.ArrayLike = 1e-5,
  dtype: jax.typing.DTypeLike = jnp.float32,
) -> jax.Array:
  """int8 symbols of `absmean_quantize(w, eps, dtype)` in EC2T's convention: 0 → -m, 1 → 0, 2 → +m.

  `dtype` is that of the params leaf (the grid `m` lies on, as in the network).
  """
  return (jnp.sign(absmean_quantize(w, eps, dtype)) + 1).astype(jnp.int8)


class AbsmeanTernaryTrainingState(NamedTuple):
  """State of `absmean_ternary_training`.

  Attributes:
    latent: float32 full-precision latent weights `W`, params-shaped
      (`optax.MaskedNode` where another transformation owns the leaf).
    latent_opt_state: state of the latent-weight optimizer.
    quantizer_eps: float32 scalar, the `ε` of the quantizer (so that
      `ec2t_jax.ternarize` and `ec2t_jax.compressed_kernels` quantize as the
      updates do).
  """

  latent: Any
  latent_opt_state: optax.OptState
  quantizer_eps: jax.Array


def is_absmean_state(x: Any) -> bool:
  """True for the state of `absmean_ternary_training`."""
  return isinstance(x, AbsmeanTernaryTrainingState)


def straight_through_training(
  what: str,
  quantize: Quantizer,
  new_state: Callable[[Any, optax.OptState], Any],
  latent_optimizer: optax.GradientTransformation,
) -> optax.GradientTransformation:
  """Trains every leaf it is given into `quantize` of its latent weights (straight-through).

  One update, with `G = ∂L/∂q` the gradient w.r.t. the params leaf `q = Q(W)`:

      W ← W + latent_optimizer(G)      (STE: ∂q/∂W taken as the identity)
      q ← Q(W) = quantize(state, W, params dtype)

  and the returned update turns each params leaf into the new `Q(W)` exactly
  under `optax.apply_updates` (so `quantize` must give values that it can
  reach exactly: levels snapped as `ternary.snap_centroids` does, +0.0 for
  zeros). A gradient with a NaN or inf leaves the whole state as it was (a
  zero update). `init` copies the params (as float32) into the latent weights.

  Args:
    what: the transformation's name, for errors.
    quantize: `(state, w, dtype) -> q`, the kernel of one leaf.
    new_state: `(latent, latent_opt_state) -> state`, a NamedTuple with the
      fields `latent` and `latent_opt_state` (and any settings `quantize` reads).
    latent_optimizer: optimizer of the latent weights.

  Returns:
    An `optax.GradientTransformation` whose state is `new_state(...)`'s.

  Raises:
    ValueError: at `init`, for a leaf that is not floating point; at `update`,
      without params.
  """

  def init_fn(params):
    for name, leaf in tree_util.named_leaves(params, skip_masked=True):
      if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
        raise ValueError(
          f'{what} is given {name} of dtype {jnp.result_type(leaf)}; only '
          'floating-point leaves can be ternarized'
        )
      transforms.check_leaf_values(leaf, f'{what} is given {name}')
    latent = jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params)
    return new_state(latent, latent_optimizer.init(latent))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(f'{what} needs the current params: call update(grads, state, params).')
    # 1. Straight-through: the gradient w.r.t. Q(W) steps W unchanged.
    grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), updates)
    steps, opt_state = latent_optimizer.update(grads, state.latent_opt_state, state.latent)
    latent = optax.apply_updates(state.latent, steps)
    # 2. A NaN/inf gradient would make W NaN for good: keep the state instead.
    checks = [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]
    finite = jnp.all(jnp.stack(checks)) if checks else jnp.ones((), bool)
    new = state._replace(latent=latent, latent_opt_state=opt_state)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)

    # 3. The new kernel Q(W), reached exactly by `optax.apply_updates`, quantized with
    # the state's settings (those `ec2t_jax.ternarize` and `compressed_kernels` read).
    def kernel_update(p, w):
      q = quantize(new, w, p.dtype)
      u = ternary.exact_update(p, q)
      # From params that are not ternary yet (no `ternarize` after `init`) an exact
      # `u` may not exist; `p + (-p)` is exactly 0, so the leaf still holds only
      # the levels of Q(W) and 0 (the next update places Q(W) again).
      return jnp.where(p + u == q, u, -p)

    return jax.tree.map(kernel_update, params, new.latent), new

  return optax.GradientTransformation(init_fn, update_fn)


def absmean_ternary_training(
  *,
  latent_optimizer: optax.GradientTransformation | None = None,
  eps: jax.typing.ArrayLike = 1e-5,
) -> optax.GradientTransformation:
  """Trains every leaf it is given into an absmean-ternary kernel (straight-through estimator).

  One update, with `G = ∂L/∂q` the gradient w.r.t. the params leaf `q = Q(W)`:

      W ← W + latent_optimizer(G)      (STE: ∂q/∂W taken as the identity)
      q ← Q(W) = round(clip(W / (m + ε), -1, 1)) · m,   m = mean|W|

  and the returned update turns each params leaf into the new `Q(W)` exactly
  under `optax.apply_updates`. A gradient with a NaN or inf leaves the latent
  weights and their optimizer as they were (a zero update).

  `init` copies the params (as float32) into the latent weights; call
  `ec2t_jax.ternarize(params, opt_state)` once after it, as for `ec2t`, so the
  network starts ternary.

  Use it under `optax.partition` so that it sees only the leaves to ternarize,
  or call `absmean_ternary`, which does that.

  Args:
    latent_optimizer: optimizer of the latent weights (default Adam, 1e-4).
    eps: `ε >= 0` of the quantizer.

  Returns:
    An `optax.GradientTransformation` whose state is an `AbsmeanTernaryTrainingState`.

  Raises:
    ValueError: for a negative or non-finite `eps`; at `init`, for a leaf that is
      not floating point.

  Example:
    >>> params = {'kernel': jnp.array([0.5, -1.0, 0.25, 0.25])}
    >>> tx = absmean_ternary_training(latent_optimizer=optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> ec2t_jax.ternarize(params, state)['kernel'].tolist()
    [0.5, -0.5, 0.0, 0.0]
  """
  transforms.check_hyperparameter('eps', eps, minimum=0.0, strict=False)
  return straight_through_training(
    'absmean_ternary_training',
    _absmean_quantize_with_state,
    lambda latent, opt_state: AbsmeanTernaryTrainingState(
      latent, opt_state, jnp.asarray(eps, jnp.float32)
    ),
    latent_optimizer or optax.adam(1e-4),
  )


def _absmean_quantize_with_state(
  state: AbsmeanTernaryTrainingState, w: jax.Array, dtype: jax.typing.DTypeLike
) -> jax.Array:
  """`absmean_quantize` of `w` with the state's ε."""
  return absmean_quantize(w, state.quantizer_eps, dtype)


def absmean_ternary(
  ternary_mask: masks_lib.MaskOrFn,
  *,
  latent_optimizer: optax.GradientTransformation | None = None,
  fp_optimizer: optax.GradientTransformation | None = None,
  fixed_mask: masks_lib.MaskOrFn | None = None,
  eps: jax.typing.ArrayLike = 1e-5,
) -> optax.GradientTransformation:
  """BitNet b1.58's absmean ternarization as one optax optimizer, shaped like `ec2t`.

  The ternary leaves get `absmean_ternary_training` (latent weights `W` in the
  state, the params hold `Q(W) = round(clip(W / (m + ε), -1, 1)) · m` with
  `m = mean|W|` per leaf, gradients applied to `W` straight through), the
  others `fp_optimizer`; `fixed_mask` leaves and integer leaves get zero
  updates. Call `ec2t_jax.ternarize(params, opt_state)` once after `init`, as
  for `ec2t`; from then on the params stay exactly ternary.

  Differences from EC2T (docs/algorithm.md): one symmetric level `±m` per
  layer instead of two trained centroids `+w_p`, `-w_n`; no entropy term, so
  the sparsity is whatever the rounding gives (about a third of the weights of
  a Gaussian-like layer fall below `m/2`) and cannot be tuned; no frozen
  phase. See docs/baselines.md.

  Reference: Ma et al., "The Era of 1-bit LLMs: All Large Language Models are
  in 1.58 Bits", 2024, arXiv:2402.17764.

  Args:
    ternary_mask: pytree of bools (or `params -> pytree of bools`) selecting the
      leaves to ternarize; see `ec2t_jax.masks.default_ternary_mask`.
    latent_optimizer: optimizer of the latent weights (default Adam, 1e-4).
    fp_optimizer: optimizer of all other float params (default
      `ec2t_jax.default_fp_optimizer()`).
    fixed_mask: leaves held exactly as they are (zero updates, no state).
    eps: `ε >= 0` of the quantizer.

  Returns:
    An `optax.GradientTransformation`; its state holds one
    `AbsmeanTernaryTrainingState`.

  Raises:
    ValueError: for a bad `eps`; at `init`, for masks that select nothing,
      overlap, or select non-float leaves.

  Example:
    >>> import ec2t_jax, optax
    >>> params = {'dense': {'kernel': jnp.linspace(-1, 1, 12).reshape(3, 4),
    ...                     'bias': jnp.zeros(4)}}
    >>> tx = ec2t_jax.baselines.absmean_ternary({'dense': {'kernel': True, 'bias': False}})
    >>> opt_state = tx.init(params)
    >>> params = ec2t_jax.ternarize(params, opt_state)
    >>> levels = sorted(set(params['dense']['kernel'].ravel().tolist()))
    >>> len(levels), levels[0] == -levels[-1]  # m = mean|W| = 6/11, snapped.
    (3, True)
  """
  return alias.compression_partition(
    ternary_mask,
    absmean_ternary_training(latent_optimizer=latent_optimizer, eps=eps),
    fp_optimizer or alias.default_fp_optimizer(),
    fixed_mask=fixed_mask,
    check_fp_dtypes=fp_optimizer is None,
  )


def states(opt_state: optax.OptState) -> list[AbsmeanTernaryTrainingState]:
  """All `AbsmeanTernaryTrainingState` inside `opt_state`."""
  return methods.states_of(opt_state, is_absmean_state)


# --- latent-weight baselines in the method registry (`ec2t_jax.methods`) ----------------------

# The keys of `config.ec2t` (or a stage's settings) a latent-weight baseline's optimizer reads.
LATENT_SETTINGS = ('latent_learning_rate', 'learning_rate', 'weight_decay')


def latent_method(
  name: str,
  factory: Callable[..., optax.GradientTransformation],
  owns: Callable[[Any], bool],
  quantize: Quantizer,
  scale: Quantizer,
) -> methods.CompressionMethod:
  """The `ec2t_jax.methods.CompressionMethod` of a latent-weight baseline (absmean, TWN).

  Its `optimizer(settings, ternary_mask, *, prune_mask=None, fixed_mask=None,
  freeze_at=None)` is `factory(ternary_mask, latent_optimizer=optax.adam(
  settings['latent_learning_rate']), fp_optimizer=ec2t_jax.default_fp_optimizer(
  settings['learning_rate'], settings['weight_decay']), fixed_mask=fixed_mask)`.
  Such a method has no assignment to freeze (`freeze_at` is ignored, so a frozen
  stage continues training) and cannot prune (a `prune_mask` is refused). Its
  state views read the state's latent weights: the kernel is `quantize`, the
  levels are `±scale`, both in the params leaf's dtype.

  Args:
    name: the registry name.
    factory: `factory(ternary_mask, *, latent_optimizer, fp_optimizer,
      fixed_mask) -> optax.GradientTransformation`, e.g. `absmean_ternary`.
    owns: True for the method's state (e.g. `is_absmean_state`); the state has
      a params-shaped `latent` field (float32, `optax.MaskedNode` elsewhere).
    quantize: `(state, w, dtype) -> kernel` of one leaf.
    scale: `(state, w, dtype) -> level`, the float32 scalar `m` of the kernel's
      `{-m, 0, +m}`.

  Returns:
    A `CompressionMethod` with `can_prune=False` and `settings=LATENT_SETTINGS`.
  """

  def optimizer(
    settings: Any,
    ternary_mask: masks_lib.MaskOrFn,
    *,
    prune_mask: masks_lib.MaskOrFn | None = None,
    fixed_mask: masks_lib.MaskOrFn | None = None,
    freeze_at: int | None = None,
  ) -> optax.GradientTransformation:
    """The trainer's optimizer of one pass, from `config.ec2t` (see `latent_method`)."""
    del freeze_at  # No assignment to freeze: a frozen stage simply continues training.
    if prune_mask is not None:
      raise methods.pruning_error(
        name, prune_pattern=methods.get_setting(settings, 'prune_pattern') or None
      )
    s = methods.read_settings(settings, LATENT_SETTINGS, name)
    return factory(
      ternary_mask,
      latent_optimizer=optax.adam(s['latent_learning_rate']),
      fp_optimizer=alias.default_fp_optimizer(s['learning_rate'], s['weight_decay']),
      fixed_mask=fixed_mask,
    )

  def kernels(state: Any, dtype_of: methods.DtypeOf) -> dict[str, jax.Array]:
    """`{path: quantize(state, W, dtype)}` of the state's latent weights."""
    latent = tree_util.flat_dict(state.latent, skip_masked=True)
    return {n: quantize(state, w, dtype_of(n)) for n, w in latent.items()}

  def layers(state: Any, dtype_of: methods.DtypeOf) -> dict[str, methods.CompressedLayer]:
    """`{path: CompressedLayer}`: symbols of `quantize`, levels `±scale`, no λ."""
    out = {}
    for n, w in tree_util.flat_dict(state.latent, skip_masked=True).items():
      dtype = dtype_of(n)
      m = scale(state, w, dtype)
      symbols = (jnp.sign(quantize(state, w, dtype)) + 1).astype(jnp.int8)
      out[n] = methods.CompressedLayer(assignment=symbols, w_p=m, w_n=m, latent=w)
    return out

  return methods.CompressionMethod(
    name=name,
    optimizer=optimizer,
    owns=owns,
    kernels=kernels,
    layers=layers,
    can_prune=False,
    settings=LATENT_SETTINGS,
  )


ABSMEAN = latent_method(
  'absmean',
  absmean_ternary,
  is_absmean_state,
  _absmean_quantize_with_state,
  lambda state, w, dtype: absmean_scale(w, dtype),
)
