"""`ec2t(...)`: the one-call EC2T optimizer, composed from `ec2t_jax.transforms`.

Also the routing every compression method shares (`compression_partition`) and
EC2T's entry in the method registry (`EC2T`, `ec2t_jax.methods`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from ec2t_jax import masks as masks_lib
from ec2t_jax import methods, ternary, transforms, tree_util

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
      optimizer in `optax.apply_if_finite`. (`ec2t_jax.training` passes False
      here and to `guard_nonfinite`: its trainer stops, or skips and counts,
      such steps itself.)
    guard_nonfinite: with `skip_nonfinite=False`, whether the ternary and
      pruned leaves still skip a non-finite update (default); False leaves
      non-finite updates unguarded everywhere (the caller guards the state).
      Under `skip_nonfinite` it changes nothing.
    warn_if_moved: warn once when the params are not the kernels of the last
      update (see `ternary_training`); the trainer passes False.
    reference_parity: reproduce the original's quirks (docs/algorithm.md §3–4).
    group_layers: keep the leaves of one dtype in one flat buffer and update
      all layers at once (see `ternary_training`).

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
  # Under skip_nonfinite the guard below keeps every state; a second one inside the
  # ternary and pruned parts would only add a select per buffer.
  hyperparams['guard_nonfinite'] = hyperparams['guard_nonfinite'] and not skip_nonfinite
  ternary_tx = transforms.ternary_training(**hyperparams)  # Validates them all.
  fp = fp_optimizer or default_fp_optimizer()
  freeze = hyperparams['freeze_assignment_at']
  if reset_optimizers_at_freeze and freeze is not None:
    fp = transforms.reset_at_step(fp, freeze)
  prune_tx = None
  if prune_mask is not None:
    prune_tx = transforms.entropy_constrained_pruning(**hyperparams)
  inner = compression_partition(
    ternary_mask,
    ternary_tx,
    fp,
    prune_mask=prune_mask,
    prune_tx=prune_tx,
    fixed_mask=fixed_mask,
    check_fp_dtypes=fp_optimizer is None,
  )
  if not skip_nonfinite:
    return inner

  def update_fn(updates, state, params=None):
    # One NaN/inf gradient anywhere skips the whole update (every part keeps its
    # state), so the ternary and full-precision parts never step out of line. A
    # select per leaf, which XLA fuses into the kernels that compute the new values
    # (a `lax.cond` around the update made XLA copy every state leaf into it, and
    # one finiteness reduction per leaf added a kernel per leaf).
    new_updates, new_state = inner.update(updates, state, params)
    finite = _all_finite(updates)
    # `lax.select` with the scalar predicate, not `jnp.where`: the same HLO, traced
    # without a nested jit per leaf (ResNet-20's update: 40 nested jit calls, not 195).
    new_state = jax.tree.map(
      lambda n, o: jax.lax.select(finite, n, jnp.asarray(o, n.dtype)), new_state, state
    )
    new_updates = jax.tree.map(lambda u: jax.lax.select(finite, u, jnp.zeros_like(u)), new_updates)
    return new_updates, new_state

  return optax.GradientTransformation(inner.init, update_fn)


def compression_partition(
  ternary_mask: masks_lib.MaskOrFn,
  ternary_tx: optax.GradientTransformation,
  fp_tx: optax.GradientTransformation,
  *,
  prune_mask: masks_lib.MaskOrFn | None = None,
  prune_tx: optax.GradientTransformation | None = None,
  fixed_mask: masks_lib.MaskOrFn | None = None,
  check_fp_dtypes: bool = False,
) -> optax.GradientTransformation:
  """Routes each params leaf to its transformation by the masks: the optimizer of every method.

  `optax.partition` over the labels of `cached_param_labels`: the leaves of
  `ternary_mask` go to `ternary_tx`, those of `prune_mask` to `prune_tx`,
  those of `fixed_mask` and integer leaves get zero updates (and no state),
  all others go to `fp_tx`. `ec2t`, `ec2t_jax.baselines.absmean_ternary` and
  `ec2t_jax.twn.twn_ternary` are this with their own `ternary_tx`.

  Args:
    ternary_mask: pytree of bools (or `params -> pytree of bools`) of the leaves to ternarize.
    ternary_tx: the transformation of those leaves.
    fp_tx: the transformation of the other float leaves.
    prune_mask: the same for the leaves to prune, or None.
    prune_tx: the transformation of those leaves; needed with a `prune_mask`.
    fixed_mask: the same for leaves held as they are, or None.
    check_fp_dtypes: refuse, at `init`, float16 leaves for `fp_tx` (pass True
      when `fp_tx` is `default_fp_optimizer()`, whose Adam underflows there).

  Returns:
    An `optax.GradientTransformation` whose state is an `optax.PartitionState`
    with one inner state per label (`'ternary'`, `'full_precision'`,
    `'non_float'`, and `'prune'`, `'fixed'` with their masks).

  Raises:
    ValueError: for a `prune_mask` without `prune_tx`; at `init`, for masks that
      select nothing, overlap, or select non-float leaves.
  """
  if (prune_mask is None) != (prune_tx is None):
    raise ValueError(
      'compression_partition needs prune_mask and prune_tx together, got '
      f'prune_mask={"None" if prune_mask is None else "a mask"} and '
      f'prune_tx={"None" if prune_tx is None else "a transformation"}'
    )
  # NON_FLOAT holds no state, so the optimizer state of a float-only model is unchanged.
  parts = {TERNARY: ternary_tx, FULL_PRECISION: fp_tx, NON_FLOAT: optax.set_to_zero()}
  if prune_tx is not None:
    parts[PRUNE] = prune_tx
  if fixed_mask is not None:
    parts[FIXED] = optax.set_to_zero()
  labels = cached_param_labels(ternary_mask, prune_mask, fixed_mask)
  inner = optax.partition(parts, labels)

  def init_fn(params):
    state = inner.init(params)  # Refuses bad masks and compressed-leaf dtypes first.
    if check_fp_dtypes:
      _check_default_fp_dtypes(params, labels(params))
    return state

  def update_fn(updates, state, params=None):
    _check_gradient_dtypes(updates, params)  # Else the labels would blame the params.
    return inner.update(updates, state, params)

  return optax.GradientTransformation(init_fn, update_fn)


def _check_gradient_dtypes(updates: optax.Updates, params: optax.Params | None) -> None:
  """Refuses a non-float gradient of a float params leaf, naming the gradient."""
  if params is None:
    return
  grads, p_leaves = tree_util.named_leaves(updates), jax.tree.leaves(params)
  if len(grads) != len(p_leaves):
    return  # The partition names the structure mismatch.
  for (name, g), p in zip(grads, p_leaves, strict=True):
    g_dtype, p_dtype = jnp.result_type(g), jnp.result_type(p)
    if jnp.issubdtype(p_dtype, jnp.floating) and not jnp.issubdtype(g_dtype, jnp.floating):
      raise ValueError(
        f'the gradient of {name} has dtype {g_dtype} but the param is {p_dtype}: gradients of '
        'float params must be floating point (differentiate a float loss, or cast the '
        'gradient to the param dtype)'
      )


def _all_finite(tree: optax.Updates) -> jax.Array:
  """A bool scalar: every floating element of `tree` is finite.

  `transforms.all_finite` of each dtype's leaves flattened together (XLA fuses the
  concatenation into the sum), rather than one reduction per leaf.
  """
  by_dtype: dict[str, list[jax.Array]] = {}
  for x in jax.tree.leaves(tree):
    dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.inexact):
      by_dtype.setdefault(str(dtype), []).append(jnp.ravel(x))
  return transforms.all_finite([jnp.concatenate(xs) for xs in by_dtype.values()])


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


# --- EC2T in the method registry (`ec2t_jax.methods`) -------------------------------------

# The keys of `config.ec2t` (or a stage's settings) that EC2T's trainer optimizer reads.
EC2T_SETTINGS = (
  'gamma',
  'init_scale',
  'sustain',
  'p0_min',
  'centroid_floor_std',
  'latent_learning_rate',
  'centroid_learning_rate',
  'learning_rate',
  'weight_decay',
  'reference_parity',
)


def ec2t_from_settings(
  settings: Any,
  ternary_mask: masks_lib.MaskOrFn,
  *,
  prune_mask: masks_lib.MaskOrFn | None = None,
  fixed_mask: masks_lib.MaskOrFn | None = None,
  freeze_at: int | None = None,
) -> optax.GradientTransformation:
  """The trainer's EC2T optimizer of one pass, from `config.ec2t` (`settings`): `EC2T.optimizer`.

  `ec2t(...)` with γ, s, ς, `p0_min`, the centroid floor and `reference_parity`
  from `settings`; Adam with `latent_learning_rate` on the latent weights and
  with `centroid_learning_rate` on the centroids; `default_fp_optimizer(
  learning_rate, weight_decay)` on the other leaves; ECP on the `prune_mask`
  leaves; the assignment freezes at update `freeze_at`. Non-finite gradients
  are not skipped here, not even in the ternary part (`skip_nonfinite=False`,
  `guard_nonfinite=False`): the trainer stops on, or skips and counts, such
  steps itself. It applies the updates unchanged, so the check that the params
  are the last update's kernels is off (`warn_if_moved=False`).

  Raises:
    ValueError: for settings that lack a key of `EC2T_SETTINGS`, or bad values.
  """
  s = methods.read_settings(settings, EC2T_SETTINGS, 'ec2t')
  return ec2t(
    ternary_mask,
    gamma=s['gamma'],
    init_scale=s['init_scale'],
    sustain=s['sustain'],
    p0_min=s['p0_min'],
    centroid_floor_std=s['centroid_floor_std'],
    latent_optimizer=optax.adam(s['latent_learning_rate']),
    centroid_optimizer=optax.adam(s['centroid_learning_rate']),
    fp_optimizer=default_fp_optimizer(s['learning_rate'], s['weight_decay']),
    prune_mask=prune_mask,
    fixed_mask=fixed_mask,
    freeze_assignment_at=freeze_at,
    reference_parity=s['reference_parity'],
    skip_nonfinite=False,
    guard_nonfinite=False,
    warn_if_moved=False,
  )


def _ec2t_kernels(state: transforms.CompressionState, dtype_of: methods.DtypeOf):
  """`{path: kernel}` of an EC2T (ternary) or ECP (pruned) state, from its assignment."""
  prune = isinstance(state, transforms.EntropyConstrainedPruningState)
  assignment = tree_util.flat_dict(state.assignment, skip_masked=True)
  if prune:
    latent = tree_util.flat_dict(state.latent, skip_masked=True)
    return {n: ternary.pruned_kernel(a, latent[n], dtype_of(n)) for n, a in assignment.items()}
  centroids = tree_util.flat_dict(state.centroids, skip_masked=True)
  return {n: ternary.ternary_kernel(a, centroids[n], dtype_of(n)) for n, a in assignment.items()}


def _ec2t_layers(state: transforms.CompressionState, dtype_of: methods.DtypeOf):
  """`{path: CompressedLayer}` of an EC2T or ECP state (its levels do not depend on dtypes)."""
  del dtype_of  # The state holds the centroids exactly as placed in the network.
  centroids = tree_util.flat_dict(state.centroids, skip_masked=True)
  latent = tree_util.flat_dict(state.latent, skip_masked=True)
  lam = tree_util.flat_dict(state.lam, skip_masked=True)
  pmf = tree_util.flat_dict(state.pmf, skip_masked=True)
  return {
    n: methods.CompressedLayer(
      assignment=a,
      w_p=centroids[n][0],
      w_n=centroids[n][1],
      latent=latent[n],
      lam=lam[n],
      pmf=pmf[n],
    )
    for n, a in tree_util.flat_dict(state.assignment, skip_masked=True).items()
  }


EC2T = methods.CompressionMethod(
  name='ec2t',
  optimizer=ec2t_from_settings,
  owns=transforms.is_compression_state,
  kernels=_ec2t_kernels,
  layers=_ec2t_layers,
  can_prune=True,
  settings=EC2T_SETTINGS,
)
