"""`ec2t(...)`: the one-call EC2T optimizer, composed from `ec2t_jax.transforms`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ec2t_jax import masks as masks_lib
from ec2t_jax import transforms, tree_util

TERNARY, PRUNE, FULL_PRECISION = 'ternary', 'prune', 'full_precision'
# Leaves held fixed (e.g. layers an earlier pass compressed): a zero update, no state.
FIXED = 'fixed'
# Integer and boolean leaves (step counters, indices): no optimizer changes them.
NON_FLOAT = 'non_float'


def default_fp_optimizer(
  learning_rate: optax.ScalarOrSchedule = 1e-4, weight_decay: float = 5e-6
) -> optax.GradientTransformation:
  """The original's optimizer of the full-precision params: coupled L2, then Adam.

  `g ← g + weight_decay·p` before Adam (PyTorch `Adam(weight_decay=...)`), not AdamW.
  """
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))


def param_labels(
  params: optax.Params,
  ternary_mask: masks_lib.MaskOrFn,
  prune_mask: masks_lib.MaskOrFn | None = None,
  fixed_mask: masks_lib.MaskOrFn | None = None,
) -> optax.Params:
  """Labels each leaf `'ternary'`, `'prune'`, `'fixed'`, `'full_precision'` or `'non_float'`.

  Integer and boolean leaves that no mask selects are `'non_float'`: `ec2t`
  leaves them unchanged (a zero update) instead of giving them to the
  full-precision optimizer, which would round its float update into them.
  `'fixed'` leaves (`fixed_mask`) are held as they are, e.g. the ternary
  layers of an earlier pass while a later one prunes other layers.

  Raises:
    ValueError: if neither the ternary nor the prune mask selects anything, a
      leaf is selected by two masks, or a compressed leaf is not floating point.
  """
  tern = masks_lib.resolve(ternary_mask, params)
  prune = masks_lib.resolve(prune_mask, params)
  fixed = masks_lib.resolve(fixed_mask, params)
  problems = []
  for (path, leaf), t, p, f in zip(
    tree_util.named_leaves(params),
    jax.tree.leaves(tern),
    jax.tree.leaves(prune),
    jax.tree.leaves(fixed),
    strict=True,
  ):
    if t and p:
      problems.append(f'{path} is selected by both ternary_mask and prune_mask')
    if f and (t or p):
      what = 'ternary_mask' if t else 'prune_mask'
      problems.append(f'{path} is selected by both fixed_mask and {what}')
    if (t or p) and not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
      problems.append(
        f'{path} has dtype {jnp.asarray(leaf).dtype}; only floating-point leaves can be '
        'ternarized or pruned'
      )
  if problems:
    raise ValueError('invalid EC2T masks: ' + '; '.join(problems[:5]))
  if not any(jax.tree.leaves(tern)) and not any(jax.tree.leaves(prune)):
    names = [name for name, _ in tree_util.named_leaves(params)]
    raise ValueError(
      f'ternary_mask selects no parameter (and no prune_mask does); params leaves are {names[:8]}'
      + (' ...' if len(names) > 8 else '')
      + ' (see ec2t_jax.masks.default_ternary_mask)'
    )

  def label(t, p, f, leaf):
    if t:
      return TERNARY
    if p:
      return PRUNE
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      return NON_FLOAT
    return FIXED if f else FULL_PRECISION

  return jax.tree.map(label, tern, prune, fixed, params)


@transforms.with_arguments_of(
  transforms.ternary_training, exclude=('reset_centroid_optimizer_at_freeze',)
)
def ec2t(
  ternary_mask: masks_lib.MaskOrFn,
  *,
  fp_optimizer: optax.GradientTransformation | None = None,
  prune_mask: masks_lib.MaskOrFn | None = None,
  fixed_mask: masks_lib.MaskOrFn | None = None,
  reset_optimizers_at_freeze: bool = True,
  skip_nonfinite: bool = True,
  **hyperparams,
) -> optax.GradientTransformation:
  """Entropy-Constrained Trained Ternarization as one optax optimizer.

  Partitions the params into ternary leaves (`ternary_training`), pruned
  leaves (`entropy_constrained_pruning`) and the rest (`fp_optimizer`). Call
  `ec2t_jax.ternarize(params, opt_state)` once after `init`; from then on the
  params pytree *is* the ternary network and stays exactly ternary under
  `optax.apply_updates`.

  Defaults reproduce the original recipe (docs/algorithm.md §3.4): latent weights Adam 1e-4,
  centroids Adam 1e-5, everything else coupled L2 5e-6 then Adam 1e-4, and
  fresh optimizer states for centroids and full-precision params at the
  switch to the frozen phase.

  Args:
    ternary_mask: pytree of bools (or `params -> pytree of bools`) selecting the
      leaves to ternarize; see `ec2t_jax.masks.default_ternary_mask`.
    gamma: entropy gain `γ >= 0`; 0 is ternarization without entropy constraint.
    init_scale: initial centroid scale `s > 0`.
    sustain: `ς` of the per-layer scaling `δ_l`.
    p0_min: floor of the zero cluster's probability.
    centroid_floor_std: centroids stay >= this times `std(W)`.
    latent_optimizer: optimizer of the latent weights.
    centroid_optimizer: optimizer of the centroids.
    fp_optimizer: optimizer of all other params.
    prune_mask: leaves that get entropy-constrained pruning instead (docs/algorithm.md §6).
      With a prune mask the ternary mask may select nothing (a pruning-only pass).
    fixed_mask: leaves held exactly as they are (zero updates, no state), e.g.
      the ternary layers of an earlier pass while this one prunes others.
    freeze_assignment_at: first step of the frozen-assignment phase, or None.
    reset_optimizers_at_freeze: restart the centroid and full-precision
      optimizer states at that step, as the original does.
    skip_nonfinite: an update whose gradients hold a NaN or inf leaves the
      params and every optimizer state as they were (zero updates), instead
      of making the latent weights, centroids and Adam moments NaN for good.
      Without it the ternary and pruned leaves still skip such an update, but
      `fp_optimizer` does not. To count the skipped updates, wrap the
      optimizer in `optax.apply_if_finite`. (`ec2t_jax.training` passes False:
      its trainer stops, or skips and counts, such steps itself.)
    reference_parity: reproduce the original's quirks (docs/algorithm.md §3–4).
    group_layers: batch the per-layer math of same-shaped leaves with
      `jax.vmap` (see `ternary_training`).

  Returns:
    An `optax.GradientTransformation`. Under `optax.inject_hyperparams`, pass a
    callable `ternary_mask` through `static_args=('ternary_mask', ...)`.

  Example:
    >>> import ec2t_jax, optax
    >>> params = {'dense': {'kernel': jnp.linspace(-1, 1, 12).reshape(3, 4),
    ...                     'bias': jnp.zeros(4)}}
    >>> tx = ec2t_jax.ec2t(lambda p: {'dense': {'kernel': True, 'bias': False}})
    >>> opt_state = tx.init(params)
    >>> params = ec2t_jax.ternarize(params, opt_state)
    >>> len(set(params['dense']['kernel'].ravel().tolist())) <= 3
    True
  """
  hyperparams['reset_centroid_optimizer_at_freeze'] = reset_optimizers_at_freeze
  ternary_tx = transforms.ternary_training(**hyperparams)  # Validates them all.
  fp = fp_optimizer or default_fp_optimizer()
  freeze = hyperparams['freeze_assignment_at']
  if reset_optimizers_at_freeze and freeze is not None:
    fp = transforms.reset_at_step(fp, freeze)
  # NON_FLOAT holds no state, so the optimizer state of a float-only model is unchanged.
  parts = {TERNARY: ternary_tx, FULL_PRECISION: fp, NON_FLOAT: optax.set_to_zero()}
  if prune_mask is not None:
    parts[PRUNE] = transforms.entropy_constrained_pruning(**hyperparams)
  if fixed_mask is not None:
    parts[FIXED] = optax.set_to_zero()
  labels = cached_param_labels(ternary_mask, prune_mask, fixed_mask)
  inner = optax.partition(parts, labels)

  def init_fn(params):
    state = inner.init(params)  # Refuses bad masks and compressed-leaf dtypes first.
    if fp_optimizer is None:
      _check_default_fp_dtypes(params, labels(params))
    return state

  if not skip_nonfinite:
    return optax.GradientTransformation(init_fn, inner.update)

  def update_fn(updates, state, params=None):
    # One NaN/inf gradient anywhere skips the whole update (every part keeps its
    # state), so the ternary and full-precision parts never step out of line. A
    # `lax.cond`, not a `jnp.where` per leaf: selecting each of a large model's
    # hundreds of state leaves made XLA:CPU compile MicroNet's update for minutes.
    def apply(operands):
      return inner.update(*operands)

    shapes = jax.eval_shape(apply, (updates, state, params))

    def skip(operands):
      # Zero updates and the unchanged state, as `apply` types and nests them (a Flax
      # NNX `Param` around an update stays one).
      zeros = jax.tree.map(lambda like: jnp.zeros(like.shape, like.dtype), shapes[0])
      kept = jax.tree.map(lambda x, like: jnp.asarray(x, like.dtype), operands[1], shapes[1])
      return zeros, kept

    return jax.lax.cond(_all_finite(updates), apply, skip, (updates, state, params))

  return optax.GradientTransformation(init_fn, update_fn)


def _all_finite(tree: optax.Updates) -> jax.Array:
  """A bool scalar: every floating element of `tree` is finite."""
  checks = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
  ]
  return jnp.all(jnp.stack(checks)) if checks else jnp.ones((), bool)


def _check_default_fp_dtypes(params: optax.Params, labels: optax.Params) -> None:
  """Refuses float16 leaves for the default full-precision optimizer (Adam underflows there)."""
  for (name, leaf), label in zip(
    tree_util.named_leaves(params), jax.tree.leaves(labels), strict=True
  ):
    dtype = jnp.result_type(leaf)
    if label == FULL_PRECISION and jnp.issubdtype(dtype, jnp.floating):
      if str(dtype) not in transforms.SUPPORTED_DTYPES:
        raise ValueError(
          f'{name} has dtype {dtype}; the default full-precision optimizer (Adam, eps 1e-8) '
          f'needs {", ".join(transforms.SUPPORTED_DTYPES)} params (in float16 its moments '
          'underflow and the updates become NaN): keep the params in float32 and compute in '
          "half precision with the model's dtype, or pass your own fp_optimizer"
        )


def cached_param_labels(
  ternary_mask: masks_lib.MaskOrFn,
  prune_mask: masks_lib.MaskOrFn | None = None,
  fixed_mask: masks_lib.MaskOrFn | None = None,
):
  """`param_labels` as a label function that resolves the masks once per params structure.

  Mask functions may depend on the params dict's insertion order (the order
  Flax created the layers), which JAX loses when it rebuilds a dict inside
  `jit` (keys come back sorted). Resolving once, at `init`, and keying the
  result by parameter path keeps `init` and every `update` consistent. This is
  the labelling `ec2t` (and `ec2t_jax.baselines.absmean_ternary`) give to
  `optax.partition`.

  Args:
    ternary_mask: pytree of bools, or `params -> pytree of bools`, as for `param_labels`.
    prune_mask: the same for the leaves to prune, or None.
    fixed_mask: the same for the leaves held fixed, or None.

  Returns:
    A function `params -> pytree of labels` (see `param_labels`), which raises
    `param_labels`'s `ValueError`s on the first params structure it sees.
  """
  cache = {}

  def labels(params):
    named = tree_util.named_leaves(params)
    key = tuple(sorted((n, tuple(jnp.shape(x)), str(jnp.asarray(x).dtype)) for n, x in named))
    if key not in cache:
      resolved = param_labels(params, ternary_mask, prune_mask, fixed_mask)
      cache[key] = dict(zip([n for n, _ in named], jax.tree.leaves(resolved), strict=True))
    by_path = cache[key]
    return jax.tree_util.tree_map_with_path(
      lambda path, _: by_path[tree_util.path_str(path)], params
    )

  return labels
