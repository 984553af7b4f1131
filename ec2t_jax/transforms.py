"""optax GradientTransformations that train a params pytree into a ternary network.

Two factories share one implementation:

* `ternary_training` — every leaf it sees becomes a ternary kernel
  `{-w_n, 0, +w_p}` (docs/algorithm.md §2–5);
* `entropy_constrained_pruning` — every leaf it sees keeps full-precision values
  where it is not pruned (ECP, docs/algorithm.md §6).

Both expect to see only their own leaves (use them under `optax.partition`, as
`ec2t_jax.ec2t` does) and receive `∂L/∂q`, the gradient w.r.t. the kernel of
the forward pass, which *is* the params leaf. Their state holds the latent
full-precision weights, the centroids, the assignment and the inner optimizer
states, so the params pytree itself is the compressed network. The leaves of
one dtype are stored in one flat buffer, per-layer values as small vectors
(`LayerGroup`, placed by `LayerLayout`, computed by `ec2t_jax.fused`), so a
step compiles to the same few computations whatever the number of layers; the
states' properties give each field params-shaped.

`reset_at_step` restarts any transformation's state at a given step (the
original builds fresh Adam states at the switch to the frozen phase).
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ec2t_jax import fused, ternary, tree_util

LayerLayout = fused.LayerLayout


class LayerGroup(NamedTuple):
  """The state of the `n` compressed leaves of one buffer (one dtype; see `LayerLayout`).

  Element-wise fields are `(rows, chunk)` buffers in which each leaf, flattened,
  starts on a fresh row (padding after it holds zeros and assignment 1);
  per-layer fields have a leading axis of size `n`.

  Attributes:
    latent: full-precision latent weights `W`, `(rows, chunk)` in the params dtype.
    centroids: float32 `(n, 2)`, `[w_p, w_n]` exactly as placed in the network.
    centroid_latent: float32 `(n, 2)`, the trained (unrounded) centroids.
    assignment: int8 `(rows, chunk)`, 0 → `-w_n`, 1 → `0`, 2 → `+w_p`.
    pmf: float32 `(n, 3)`, cluster probabilities of the last assignment.
    lam: float32 `(n,)`, the λ of the last assignment.
  """

  latent: jax.Array
  centroids: jax.Array
  centroid_latent: jax.Array
  assignment: jax.Array
  pmf: jax.Array
  lam: jax.Array


def _per_leaf(field: str, doc: str) -> property:
  """A read-only property: `LayerGroup` field `field` of every group, as a params-shaped tree."""

  def get(state):
    values = [getattr(g, field) for g in state.groups]
    if field in ('latent', 'assignment'):
      return state.layout.unflatten(values)
    return state.layout.split(values)

  return property(get, doc=doc)


class _CompressionFields(NamedTuple):
  """Fields shared by both compression states (see `TernaryTrainingState`)."""

  count: jax.Array
  groups: tuple[LayerGroup, ...]
  latent_opt_state: optax.OptState
  centroid_opt_state: optax.OptState
  layout: LayerLayout

  latent = _per_leaf('latent', 'Latent weights `W`, params-shaped.')
  centroids = _per_leaf('centroids', 'float32 `(2,)` per leaf, `[w_p, w_n]` as in the network.')
  centroid_latent = _per_leaf('centroid_latent', 'float32 `(2,)` per leaf, the trained centroids.')
  assignment = _per_leaf('assignment', 'int8 per leaf, 0 → `-w_n`, 1 → `0`, 2 → `+w_p`.')
  pmf = _per_leaf('pmf', 'float32 `(3,)` per leaf, cluster probabilities of the last assignment.')
  lam = _per_leaf('lam', 'float32 scalar per leaf, the λ of the last assignment.')


class TernaryTrainingState(_CompressionFields):
  """State of `ternary_training`.

  The leaves of one dtype are stored in flat buffers, one `LayerGroup` each,
  placed by `layout`. The read-only properties `latent`, `centroids`,
  `centroid_latent`, `assignment`, `pmf` and `lam` give each field as a
  params-shaped tree (`optax.MaskedNode` where another transformation owns the
  leaf).

  Attributes:
    count: int32 number of updates applied so far.
    groups: one `LayerGroup` per buffer of `layout`.
    latent_opt_state: state of the latent-weight optimizer; it sees the tuple of
      latent buffers, one `(rows, chunk)` array per group.
    centroid_opt_state: state of the centroid optimizer; it sees the tuple of
      `(n, 2)` centroids.
    layout: static; which leaf lives where.
  """

  __slots__ = ()


class EntropyConstrainedPruningState(_CompressionFields):
  """State of `entropy_constrained_pruning`; fields as in `TernaryTrainingState`."""

  __slots__ = ()


class ResetAtStepState(NamedTuple):
  """State of `reset_at_step`."""

  count: jax.Array
  inner_state: optax.OptState


# Whether `update` puts an optimization barrier between the buffers' math and the
# per-leaf updates on platforms other than CPU (see `_guarded`); `bench/performance.py`
# flips it.
_FENCE_UPDATES = True

CompressionState = TernaryTrainingState | EntropyConstrainedPruningState
_STATE_TYPES = (TernaryTrainingState, EntropyConstrainedPruningState)


def is_compression_state(x: Any) -> bool:
  """True for the state of `ternary_training` or `entropy_constrained_pruning`."""
  return isinstance(x, _STATE_TYPES)


# The dtypes a compressed leaf may have. float16 is refused: the latent weights and
# their Adam moments would live in float16, where Adam's eps (1e-8) and the squared
# gradients underflow to 0, the centroids become NaN and every weight 0.
SUPPORTED_DTYPES = ('float32', 'bfloat16', 'float64')


def _check_floating(params: optax.Params, what: str) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=tree_util.is_masked)[0]:
    if tree_util.is_masked(leaf):
      continue
    check_leaf_values(leaf, f'{what} selects {jax.tree_util.keystr(path)}')
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
        f'{what} selects {jax.tree_util.keystr(path)} of dtype {dtype}; '
        'only floating-point leaves (kernels) can be compressed.'
      )
    if str(dtype) not in SUPPORTED_DTYPES:
      raise ValueError(
        f'{what} selects {jax.tree_util.keystr(path)} of dtype {dtype}; compressed leaves must '
        f'be {", ".join(SUPPORTED_DTYPES)} (in float16 the latent weights and their optimizer '
        'underflow and the layer silently becomes zeros): keep the params in float32 and '
        "compute in half precision with the model's dtype (e.g. nn.Dense(dtype=jnp.float16))"
      )


def check_leaf_values(leaf: Any, where: str) -> None:
  """Refuses an empty leaf, or a concrete one holding NaN/inf (tracers are not checked).

  Every compression method's `init` calls it: an empty kernel has nothing to
  compress, and one NaN/inf makes its scale non-finite and the layer all zeros.

  Args:
    leaf: a params leaf selected for compression.
    where: how the error starts, e.g. `"ternary_training selects ['w']"`.

  Raises:
    ValueError: one line naming `where`, the shape or the count of NaN/inf values.
  """
  if int(np.prod(jnp.shape(leaf), dtype=np.int64)) == 0:
    raise ValueError(
      f'{where} of shape {tuple(jnp.shape(leaf))}, which has no values to compress; leave '
      'empty leaves out of the mask'
    )
  if isinstance(leaf, jax.core.Tracer) or not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
    return
  bad = int(jnp.size(leaf) - jnp.sum(jnp.isfinite(leaf)))
  if bad:
    raise ValueError(
      f'{where}, which holds {bad} NaN/inf values; its levels would be non-finite and the '
      'layer all zeros: initialize the params with finite values'
    )


def _moved(seg, p, g, prune) -> tuple[str, jax.Array]:
  """The `Segments.reduce` pair counting, per layer, the params that are not `g`'s kernel.

  Counted in float32 (exact up to 2**24 moved values per layer; the count is only
  reported), so it rides in the same reduction as the centroid gradients.
  """
  q = fused.kernel(seg, g.assignment, g.centroids, g.latent, p.dtype, prune=prune)
  return 'sum', (p != q).astype(jnp.float32)


def _warn_if_moved(what, names, moved, count, warned) -> None:
  """Warns (once) when the params are not the kernels this transformation's last update made.

  After an update, `params + updates` is exactly the ternary kernel of the
  state; a transformation chained after this one (a scale, a learning rate,
  weight decay) changes the updates and the params drift off the ternary grid.
  The check runs on device: `moved` holds, per buffer, the `(num_layers,)` counts
  of `_moved`; the host hears of it only when params moved. `names` holds the
  leaves' paths per buffer.
  """

  def report(counts):
    if warned:
      return
    warned.append(True)
    pairs = [
      (n, int(c)) for ns, cs in zip(names, counts, strict=True) for n, c in zip(ns, cs, strict=True)
    ]
    off = [f'{n} ({c} values)' for n, c in pairs if c]
    warnings.warn(
      f'{what}: the params {", ".join(off[:3])} are not the ternary kernels of its last update: '
      'a transformation after it changed its updates (e.g. optax.scale), or they were not '
      'applied; apply the updates of ec2t unchanged (see the README on what may follow ec2t)',
      stacklevel=1,
    )

  any_moved = (count > 0) & jnp.any(jnp.stack([jnp.any(m > 0) for m in moved]))
  jax.lax.cond(any_moved, lambda m: jax.debug.callback(report, m), lambda m: None, moved)


def check_hyperparameter(
  name: str, value: Any, *, minimum: float, strict: bool, below: float | None = None
) -> None:
  """Validates a concrete hyperparameter: a Python number or a concrete scalar array.

  Tracers (`optax.inject_hyperparams` inside `jit`) are not checked.

  Args:
    name: the argument's name, for the error.
    value: its value.
    minimum: the lower bound.
    strict: whether the lower bound itself is excluded.
    below: an exclusive upper bound, or None.

  Raises:
    TypeError: for a function (a schedule passed directly) or a non-number.
    ValueError: for an array of more than one value, a non-finite value or
      one out of range.
  """
  if isinstance(value, jax.core.Tracer) or isinstance(value, bool):
    return
  if callable(value):
    raise TypeError(
      f'{name} is a function ({getattr(value, "__name__", type(value).__name__)}); to change '
      f'it during training wrap the optimizer in optax.inject_hyperparams, e.g. '
      f"optax.inject_hyperparams(ec2t_jax.ec2t, static_args=('ternary_mask',))(mask, "
      f'{name}=schedule)'
    )
  if not isinstance(value, (int, float)):
    try:
      dtype, shape = jnp.result_type(value), jnp.shape(value)
    except TypeError:
      raise TypeError(f'{name} must be a number, got {type(value).__name__}') from None
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
      raise TypeError(f'{name} must be a real number, got dtype {dtype}')
    if shape != ():
      raise ValueError(
        f'{name} must be one number for every layer, got an array of shape {shape}; for '
        'per-layer values use one ec2t_jax.ternary_training per group of layers under '
        'optax.partition'
      )
  v = float(value)
  if not math.isfinite(v):
    raise ValueError(f'{name} must be a finite number, got {v}')
  if below is not None and not (minimum < v < below if strict else minimum <= v < below):
    raise ValueError(f'{name} must be in {"(" if strict else "["}{minimum:g}, {below:g}), got {v}')
  if v <= minimum if strict else v < minimum:
    raise ValueError(f'{name} must be {">" if strict else ">="} {minimum:g}, got {v}')


def all_finite(arrays: Sequence[jax.Array]) -> jax.Array:
  """A bool scalar: every element of every (floating) array is finite.

  Computed as `isfinite(Σ 0·x)`: `0·x` is 0 for a finite `x` and NaN for NaN or
  ±inf, and a sum holding one NaN is NaN. One plain sum per array is fewer
  kernels than XLA:CPU's cascade of boolean reductions for `all(isfinite(x))`.
  """
  if not arrays:  # No leaf of this kind (e.g. no ternary leaf in a pruning-only pass).
    return jnp.ones((), bool)
  return jnp.all(jnp.stack([jnp.isfinite(jnp.sum(a * jnp.zeros((), a.dtype))) for a in arrays]))


def _check_shapes(layout: LayerLayout, tree: Any, what: str) -> None:
  """Refuses a tree whose leaves do not have the shapes the state was built for (at trace time)."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=tree_util.is_masked)[0]
  if len(flat) != layout.treedef.num_leaves:
    return  # `LayerLayout.flatten` names the leaf counts.
  for members, shapes in zip(layout.groups, layout.shapes, strict=True):
    for i, want in zip(members, shapes, strict=True):
      path, leaf = flat[i]
      if tuple(jnp.shape(leaf)) != want:
        raise ValueError(
          f'{what} leaf {jax.tree_util.keystr(path)} has shape {tuple(jnp.shape(leaf))}, but the '
          f'optimizer state was built (by init) for shape {want}: the params changed shape or '
          'order between init and update; call init again with the new params'
        )


def _guarded(finite: jax.Array, step, operands, layout: LayerLayout, guard: bool = True):
  """`step(operands)` if `finite`, else zero updates and the state as it was.

  With `guard` False the new state is kept whatever `finite` says (the caller
  guards the state, or asked for no guard) and `finite` only feeds the fence.

  `step` returns `(flat updates, new state)` and `operands` is
  `(grads, params, state)`. The updates and the first row of each leaf in them
  come out of a fence: XLA can then neither fuse the buffers' whole math into
  each leaf's slice of the updates (one copy of it per layer) nor bake each
  leaf's offset into its slice (one distinct kernel to compile per layer, where
  same-shaped leaves now share one; `LayerLayout.unflatten`). On CPU the fence is
  a `lax.cond` (XLA:CPU drops optimization barriers before fusion, but a
  conditional's results are materialized); elsewhere an optimization barrier
  (`_FENCE_UPDATES`; a conditional would cost a device-to-host read per step).

  Returns:
    `(flat updates, starts, state)`, `starts` for `LayerLayout.unflatten`.
  """
  updates, new_state = step(operands)
  state = new_state
  if guard:
    state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, operands[2])
  starts = tuple(
    tuple(jnp.asarray(r, jnp.int32) for r in layout.row_starts(g))
    for g in range(len(layout.groups))
  )

  def kept(u):
    return u, starts

  def skipped(u):  # Zero updates; any offset reads zeros (unlike `kept`'s, so not hoisted).
    return tuple(jnp.zeros_like(x) for x in u), jax.tree.map(jnp.zeros_like, starts)

  def by_cond(u):
    return jax.lax.cond(finite, kept, skipped, u)

  def by_select(u):
    u = tuple(jnp.where(finite, x, jnp.zeros_like(x)) for x in u)
    return jax.lax.optimization_barrier((u, starts)) if _FENCE_UPDATES else (u, starts)

  fenced, first_rows = jax.lax.platform_dependent(updates, cpu=by_cond, default=by_select)
  return fenced, first_rows, state


def check_step(name: str, value: Any) -> None:
  """Refuses a negative step (a concrete Python number; arrays pass unchecked)."""
  if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
    raise ValueError(f'{name} must be >= 0 or None, got {value}')


def _compression_factory(prune: bool):
  """`ternary_training` (prune=False) or `entropy_constrained_pruning` (prune=True).

  Both share one signature, declared here once; `ec2t_jax.ec2t` takes the same
  keyword arguments (see `with_arguments_of`).
  """

  def factory(
    *,
    gamma: jax.typing.ArrayLike = 0.15,
    init_scale: jax.typing.ArrayLike = 0.3,
    sustain: jax.typing.ArrayLike = 0.05,
    p0_min: jax.typing.ArrayLike = 0.5,
    centroid_floor_std: jax.typing.ArrayLike = 0.675,
    latent_optimizer: optax.GradientTransformation | None = None,
    centroid_optimizer: optax.GradientTransformation | None = None,
    freeze_assignment_at: jax.typing.ArrayLike | None = None,
    reset_centroid_optimizer_at_freeze: bool = True,
    reference_parity: bool = False,
    group_layers: bool = True,
    guard_nonfinite: bool = True,
    warn_if_moved: bool = True,
  ) -> optax.GradientTransformation:
    check_hyperparameter('gamma', gamma, minimum=0.0, strict=False)
    check_hyperparameter('init_scale', init_scale, minimum=0.0, strict=True)
    check_hyperparameter('sustain', sustain, minimum=0.0, strict=False)
    check_hyperparameter('centroid_floor_std', centroid_floor_std, minimum=0.0, strict=False)
    check_hyperparameter('p0_min', p0_min, minimum=0.0, strict=False, below=1.0)
    check_step('freeze_assignment_at', freeze_assignment_at)
    latent_optimizer = latent_optimizer or optax.adam(1e-4)
    centroid_optimizer = centroid_optimizer or optax.adam(1e-5)
    state_cls = EntropyConstrainedPruningState if prune else TernaryTrainingState
    what = 'entropy_constrained_pruning' if prune else 'ternary_training'
    warned: list[bool] = []  # `_warn_if_moved` warns once per transformation.

    def init_group(segments, p):  # One buffer: every leaf of one dtype.
      centroid_latent = fused.initial_centroids(segments, p, init_scale)
      centroids = ternary.snap_centroids(centroid_latent, p.dtype)
      assignment = fused.nearest(segments, p, centroids)
      return LayerGroup(
        latent=p,
        centroids=centroids,
        centroid_latent=centroid_latent,
        assignment=assignment,
        pmf=segments.counts(assignment) / segments.sizes.astype(np.float32)[:, None],
        lam=jnp.zeros((segments.num_layers,), jnp.float32),
      )

    def init_fn(params):
      _check_floating(params, what)
      layout = LayerLayout.of(params, group_layers=group_layers)
      buffers = layout.flatten(params)
      groups = tuple(init_group(fused.Segments(layout, g), p) for g, p in enumerate(buffers))
      return state_cls(
        count=jnp.zeros((), jnp.int32),
        groups=groups,
        latent_opt_state=latent_optimizer.init(tuple(g.latent for g in groups)),
        centroid_opt_state=centroid_optimizer.init(tuple(g.centroid_latent for g in groups)),
        layout=layout,
      )

    def step(operands, names=None):
      """One update of every buffer: `(flat updates, new state)` (docs/algorithm.md §3).

      `names`: the paths of each buffer's leaves, for `_warn_if_moved`.
      """
      grads, flat_params, state = operands
      count, layout, groups = state.count, state.layout, state.groups
      segments = [fused.Segments(layout, g) for g in range(len(groups))]
      if freeze_assignment_at is None:
        frozen = jnp.zeros((), bool)
      else:
        frozen = count >= jnp.asarray(freeze_assignment_at, jnp.int32)
      latent = tuple(g.latent for g in groups)
      centroid_latent = tuple(g.centroid_latent for g in groups)
      check = warn_if_moved and names is not None and bool(groups)

      # 1. Map ∂L/∂q to the latent weights and the centroids, with the
      #    assignment and centroids that produced this step's kernel (and, in
      #    the same pass, count the params that are not that kernel).
      mapped = [
        fused.map_gradient(
          seg,
          g,
          s.assignment,
          s.centroids,
          reference_parity=reference_parity,
          prune=prune,
          also=[_moved(seg, p, s, prune)] if check else (),
        )
        for seg, g, p, s in zip(segments, grads, flat_params, groups, strict=True)
      ]
      if check:
        _warn_if_moved(what, names, [m[2][0] for m in mapped], count, warned)
      latent_grads = tuple(m[0].astype(w.dtype) for m, w in zip(mapped, latent, strict=True))
      centroid_grads = tuple(m[1] for m in mapped)

      # 2. Latent weights: their own optimizer; frozen in phase 2.
      lat_updates, lat_opt_state = latent_optimizer.update(
        latent_grads, state.latent_opt_state, latent
      )
      keep = lambda new, old: jnp.where(frozen, old, new)
      latent = jax.tree.map(keep, optax.apply_updates(latent, lat_updates), latent)
      lat_opt_state = jax.tree.map(keep, lat_opt_state, state.latent_opt_state)

      # 3. Centroids: their own optimizer (restarted at the switch if asked).
      c_opt_state = state.centroid_opt_state
      if freeze_assignment_at is not None and reset_centroid_optimizer_at_freeze:
        at_switch = count == jnp.asarray(freeze_assignment_at, jnp.int32)
        fresh = centroid_optimizer.init(centroid_latent)
        c_opt_state = jax.tree.map(lambda f, o: jnp.where(at_switch, f, o), fresh, c_opt_state)
      c_updates, c_opt_state = centroid_optimizer.update(
        centroid_grads, c_opt_state, centroid_latent
      )
      stepped_centroids = optax.apply_updates(centroid_latent, c_updates)

      def finish(seg, p, w, c_latent, a_old):
        # 4. Centroid floor from the latent weights (the phase-1 ones when frozen).
        stats = fused.latent_statistics(seg, w, centroid_floor_std)
        c_latent = jnp.maximum(c_latent, stats.floor[:, None])
        c = ternary.snap_centroids(c_latent, p.dtype)
        # 5. Entropy-constrained re-assignment; kept as it is when frozen.
        result = fused.assign(
          seg,
          w,
          c,
          stats,
          gamma=gamma,
          delta=ternary.layer_weight(seg.sizes, layout.max_size, sustain),
          p0_min=p0_min,
          reference_parity=reference_parity,
        )
        a = jnp.where(frozen, a_old, result.assignment)
        # 6. The new kernel, reached exactly by `optax.apply_updates`.
        q = fused.kernel(seg, a, c, w, p.dtype, prune=prune)
        u = ternary.exact_update(p, q)
        # A move that no float `u` can make exact (possible only when a centroid
        # changes several-fold in one step) goes to zero instead: `p + (-p)` is
        # exactly 0, and the assignment records it.
        miss = (p + u) != q
        u = jnp.where(miss, -p, u)
        a = jnp.where(miss, ternary.ZERO, a).astype(a_old.dtype)
        if prune:  # Kept weights hold exactly what `p + u` produces; store that as latent.
          w = jnp.where(a == ternary.ZERO, w, (p + u).astype(w.dtype))
        return u, LayerGroup(w, c, c_latent, a, result.pmf, result.lam)

      finished = [
        finish(*args)
        for args in zip(
          segments,
          flat_params,
          latent,
          stepped_centroids,
          [g.assignment for g in groups],
          strict=True,
        )
      ]
      new_state = state_cls(
        count=optax.safe_increment(count),
        groups=tuple(f[1] for f in finished),
        latent_opt_state=lat_opt_state,
        centroid_opt_state=c_opt_state,
        layout=layout,
      )
      return tuple(f[0] for f in finished), new_state

    def update_fn(updates, state, params=None):
      if params is None:
        raise ValueError(f'{what} needs the current params: call update(grads, state, params).')
      _check_shapes(state.layout, updates, f'{what}: the gradient')
      _check_shapes(state.layout, params, f'{what}: the params')
      grads = state.layout.flatten(updates)
      operands = (grads, state.layout.flatten(params), state)
      # A NaN/inf gradient would make the latent weights and centroids NaN for good
      # (and the layer all zeros): skip the update instead, keeping the state.
      flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=tree_util.is_masked)[0]
      names = None
      if len(flat) == state.layout.treedef.num_leaves:
        names = [[jax.tree_util.keystr(flat[i][0]) for i in g] for g in state.layout.groups]
      # Without the guard the fence still needs a predicate known only at run time;
      # the step count is never negative (`optax.safe_increment` saturates).
      finite = all_finite(grads) if guard_nonfinite else state.count >= 0
      flat_updates, starts, new_state = _guarded(
        finite, functools.partial(step, names=names), operands, state.layout, guard_nonfinite
      )
      return state.layout.unflatten(flat_updates, starts), new_state

    return optax.GradientTransformation(init_fn, update_fn)

  return factory


ternary_training = _compression_factory(prune=False)
ternary_training.__name__ = ternary_training.__qualname__ = 'ternary_training'
ternary_training.__doc__ = """Trains every leaf it is given into a ternary kernel `{-w_n, 0, +w_p}`.

One update (docs/algorithm.md §3) maps `G = ∂L/∂q` to the latent weights
(`w_p·A·G + w_n·B·G + Z·G`) and the centroids (`Σ A·G`, `−Σ B·G`), steps
both with their optimizers, raises both centroids to at least
`centroid_floor_std · std(W)`, re-assigns every weight with

  a = argmin_c (W − c)² + γ·δ_l·Λ_max·I_c      (docs/algorithm.md §4)

and returns the update that turns each params leaf into the new ternary
kernel *exactly* under `optax.apply_updates`. From step
`freeze_assignment_at` on, the assignment and latent weights stay fixed and
only the centroids train (docs/algorithm.md §5).

Use it under `optax.partition` so that it sees only the leaves to ternarize,
or call `ec2t_jax.ec2t`, which does that.

Args:
  gamma: entropy gain `γ >= 0` (the original's `--lambda-max-divrs`); 0 is
    plain nearest-neighbour ternarization.
  init_scale: `s > 0`, initial centroids `s·|max W|`, `s·|min W|`.
  sustain: `ς`, keeps small layers from losing the entropy term entirely.
  p0_min: floor of the zero cluster's probability in the entropy term.
  centroid_floor_std: both centroids stay >= this times `std(W)`.
  latent_optimizer: optimizer of the latent weights (default Adam, 1e-4).
  centroid_optimizer: optimizer of the centroids (default Adam, 1e-5).
  freeze_assignment_at: first step of the frozen-assignment phase, or None.
  reset_centroid_optimizer_at_freeze: restart the centroid optimizer's state
    at the switch, as the original does.
  reference_parity: reproduce the original's quirks (the `w_n` gradient sign
    and the probability-floor arithmetic) instead of the correct math.
  group_layers: store all leaves of one dtype in one flat buffer per state
    field (default; `ec2t_jax.fused`): the update compiles to the same few
    dozen kernels whatever the number of layers, plus one read and one write
    per leaf. False keeps one buffer per leaf. Results agree to float rounding
    either way. The inner optimizers see one array per buffer, so an
    element-wise optimizer (Adam, SGD, weight decay, global-norm clipping)
    behaves identically; one that normalizes per leaf (LARS/LAMB trust
    ratios) should run with `group_layers=False`.
  guard_nonfinite: skip an update whose gradients hold a NaN or inf (zero
    updates, the state kept), instead of making the latent weights and
    centroids NaN for good. Pass False only where the caller guards the
    state itself (`ec2t(skip_nonfinite=True)` and the trainer do): it saves a
    select per state buffer and their kernels.
  warn_if_moved: check, on device at every update, that the params are the
    kernels of the last update, and warn once when they are not (a
    transformation chained after this one changed its updates). A loop that
    applies the updates unchanged, as the trainer does, may pass False: it
    saves a comparison per weight (counted in the pass that maps the
    gradients) and the conditional host callback.
Returns:
  An `optax.GradientTransformation` whose state is a `TernaryTrainingState`.

Example:
  >>> params = {'kernel': jnp.linspace(-1., 1., 12).reshape(3, 4)}
  >>> tx = ternary_training(gamma=0.0)
  >>> state = tx.init(params)
  >>> int(state.assignment['kernel'].max())
  2
"""

entropy_constrained_pruning = _compression_factory(prune=True)
entropy_constrained_pruning.__name__ = 'entropy_constrained_pruning'
entropy_constrained_pruning.__qualname__ = 'entropy_constrained_pruning'
entropy_constrained_pruning.__doc__ = """Entropy-constrained pruning (ECP, docs/algorithm.md §6).

The centroids, probabilities, λ and argmin are those of `ternary_training`,
but kept weights stay full precision: `q = (A + B)·W`, exact zeros where the
assignment is 1. Arguments as in `ternary_training`.

Returns:
  An `optax.GradientTransformation` whose state is an
  `EntropyConstrainedPruningState`.
"""


def with_arguments_of(source: Callable[..., Any], *, exclude: Sequence[str] = ()):
  """Gives a factory `f(..., **hyperparams)` the keyword arguments of `source` as its own.

  The decorated function's signature (`inspect.signature`, `help`,
  `optax.inject_hyperparams`) lists its own arguments and then those of
  `source` (less `exclude`), with `source`'s defaults; an unknown keyword is a
  `TypeError`. So hyperparameters are declared in one place.
  """
  inherited = [p for p in inspect.signature(source).parameters.values() if p.name not in exclude]

  def decorate(f):
    own = [p for p in inspect.signature(f).parameters.values() if p.kind is not p.VAR_KEYWORD]
    full = inspect.signature(f).replace(parameters=own + inherited)

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
      unknown = sorted(set(kwargs) - set(full.parameters))
      if unknown:
        raise TypeError(
          f'{f.__name__}() got unknown keyword arguments {unknown}; valid: {list(full.parameters)}'
        )
      bound = full.bind(*args, **kwargs)
      bound.apply_defaults()
      return f(**bound.arguments)

    wrapper.__signature__ = full
    return wrapper

  return decorate


def reset_at_step(
  inner: optax.GradientTransformation, step: jax.typing.ArrayLike | None
) -> optax.GradientTransformation:
  """Restarts `inner`'s state (as `inner.init(params)`) right before update number `step`.

  With `step=None` this is `inner` with a step counter. The switch happens
  inside `jit` (no recompilation), as the original's fresh Adam states at the
  start of the frozen phase.

  Args:
    inner: the transformation to restart.
    step: the 0-based update index at which to restart, or None.

  Returns:
    An `optax.GradientTransformation` with a `ResetAtStepState`.
  """
  check_step('step', step)

  def init_fn(params):
    return ResetAtStepState(jnp.zeros((), jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None):
    inner_state = state.inner_state
    if step is not None:
      fresh = inner.init(params if params is not None else updates)
      at = state.count == jnp.asarray(step, jnp.int32)
      inner_state = jax.tree.map(lambda f, o: jnp.where(at, f, o), fresh, inner_state)
    new_updates, inner_state = inner.update(updates, inner_state, params)
    return new_updates, ResetAtStepState(optax.safe_increment(state.count), inner_state)

  return optax.GradientTransformation(init_fn, update_fn)
