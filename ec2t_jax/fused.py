"""EC2T's per-layer math over all layers at once, in a few flat buffers (docs/optimizer.md).

A compression state keeps the compressed leaves of one dtype in one buffer of
shape `(rows, CHUNK)`: each leaf, flattened, starts on a fresh row and fills
`ceil(size / CHUNK)` rows; the tail of its last row is padding (zeros, never
part of a statistic). Per-layer quantities (centroids, λ, probabilities) are
`(num_layers, ...)` vectors. Every row belongs to one layer, so a statistic of
each layer is a row reduction followed by a segment sum over the rows, and a
per-layer value reaches the elements by broadcasting it along the rows. A step
is then a fixed number of computations, whatever the number of layers: only
reading the gradients in and writing the updates out touch each leaf.

The formulas are those of `ec2t_jax.ternary` (one home); this module applies
them to the segments of a buffer. The layout (`LayerLayout`) is static: it
holds no arrays.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ec2t_jax import ternary, tree_util

# Elements per row of a buffer: a leaf wastes at most CHUNK - 1 padding elements,
# and a reduction runs over rows of this length before the segment sum.
CHUNK = 256


@dataclasses.dataclass(frozen=True)
class LayerLayout:
  """Where each compressed leaf lives in the flat buffers of a compression state.

  Attributes:
    treedef: structure of the params the state was built for, with
      `optax.MaskedNode` placeholders (leaves of other transformations) as leaves.
    groups: for each buffer, the flat indices of its leaves, in order (one
      buffer per dtype with `group_layers`, else one per leaf).
    shapes: for each buffer, the shapes of its leaves.
    max_size: number of elements of the largest compressed leaf.
    chunk: elements per row of every buffer.
  """

  treedef: Any
  groups: tuple[tuple[int, ...], ...]
  shapes: tuple[tuple[tuple[int, ...], ...], ...]
  max_size: int
  chunk: int = CHUNK

  @classmethod
  def of(cls, params: optax.Params, *, group_layers: bool) -> LayerLayout:
    """The layout for `params`: leaves of one dtype share a buffer if `group_layers`."""
    leaves, treedef = jax.tree.flatten(params, is_leaf=tree_util.is_masked)
    groups: dict[Any, list[int]] = {}
    sizes = [1]
    for i, leaf in enumerate(leaves):
      if tree_util.is_masked(leaf):
        continue
      sizes.append(_size(jnp.shape(leaf)))
      key = str(jnp.result_type(leaf)) if group_layers else i
      groups.setdefault(key, []).append(i)
    members = tuple(tuple(g) for g in groups.values())
    shapes = tuple(tuple(tuple(jnp.shape(leaves[i])) for i in g) for g in members)
    return cls(treedef, members, shapes, max(sizes))

  # --- static facts about buffer `g` (NumPy, computed while tracing) ---

  def sizes(self, g: int) -> np.ndarray:
    """int64 `(num_layers,)`: element count of each leaf of buffer `g`."""
    return np.array([_size(s) for s in self.shapes[g]], np.int64)

  def leaf_rows(self, g: int) -> np.ndarray:
    """int64 `(num_layers,)`: rows each leaf of buffer `g` occupies (at least one)."""
    return np.maximum(-(-self.sizes(g) // self.chunk), 1)

  def rows(self, g: int) -> int:
    """Number of rows of buffer `g`."""
    return int(self.leaf_rows(g).sum())

  def row_starts(self, g: int) -> np.ndarray:
    """int64 `(num_layers,)`: the first row of each leaf of buffer `g`."""
    rows = self.leaf_rows(g)
    return np.cumsum(rows) - rows

  # --- params-shaped trees <-> buffers ---

  def flatten(self, tree: Any) -> tuple[jax.Array, ...]:
    """One `(rows, chunk)` buffer per group: its leaves of `tree`, flattened and padded.

    `tree` is matched to the layout leaf by leaf, not node by node: a container
    node around a placeholder (e.g. a Flax NNX `Param(MaskedNode())` where the
    layout has a bare `MaskedNode()`) does not matter.
    """
    leaves = jax.tree.leaves(tree, is_leaf=tree_util.is_masked)
    if len(leaves) != self.treedef.num_leaves:
      raise ValueError(
        f'the tree has {len(leaves)} leaves but the EC2T state was built for params with '
        f'{self.treedef.num_leaves}: pass the same params structure to init and update'
      )
    buffers = []
    for g, members in enumerate(self.groups):
      parts = []
      for i, rows in zip(members, self.leaf_rows(g), strict=True):
        x = jnp.ravel(leaves[i])
        parts += [x, jnp.zeros((int(rows) * self.chunk - x.size,), x.dtype)]
      buffers.append(jnp.concatenate(parts).reshape(self.rows(g), self.chunk))
    return tuple(buffers)

  def unflatten(self, buffers: Sequence[Any], starts: Sequence[Sequence[Any]] | None = None) -> Any:
    """The params-shaped tree of `buffers` (placeholders where other transformations own leaves).

    Args:
      buffers: one `(rows, chunk)` array per group (or `jax.ShapeDtypeStruct`s).
      starts: None, or for each group the first row of each of its leaves as
        int32 scalars computed at run time (`row_starts` passed through a fence).
        Then each leaf is a `lax.dynamic_slice` whose offset is an operand rather
        than a constant, so the kernels of same-shaped leaves are identical and
        XLA compiles one of them instead of one per leaf.
    """
    leaves: list[Any] = [optax.MaskedNode()] * self.treedef.num_leaves
    for g, (members, buffer) in enumerate(zip(self.groups, buffers, strict=True)):
      rows = self.leaf_rows(g)
      first = self.row_starts(g) if starts is None else starts[g]
      for k, (i, shape) in enumerate(zip(members, self.shapes[g], strict=True)):
        if isinstance(buffer, jax.ShapeDtypeStruct):  # An abstract state (`jax.eval_shape`).
          leaves[i] = jax.ShapeDtypeStruct(shape, buffer.dtype)
          continue
        if starts is None:
          block = buffer[int(first[k]) : int(first[k] + rows[k])]
        else:
          block = jax.lax.dynamic_slice_in_dim(buffer, first[k], int(rows[k]), axis=0)
        leaves[i] = block.reshape(-1)[: _size(shape)].reshape(shape)
    return jax.tree.unflatten(self.treedef, leaves)

  def split(self, per_layer: Sequence[Any]) -> Any:
    """The params-shaped tree of per-layer arrays: row `k` of `per_layer[g]` for the k-th leaf."""
    leaves: list[Any] = [optax.MaskedNode()] * self.treedef.num_leaves
    for members, stacked in zip(self.groups, per_layer, strict=True):
      for k, i in enumerate(members):
        if isinstance(stacked, jax.ShapeDtypeStruct):
          leaves[i] = jax.ShapeDtypeStruct(stacked.shape[1:], stacked.dtype)
        else:
          leaves[i] = stacked[k]
    return jax.tree.unflatten(self.treedef, leaves)


jax.tree_util.register_static(LayerLayout)


def _size(shape: Sequence[int]) -> int:
  return int(math.prod(shape))


class Segments:
  """The reductions and broadcasts between a `(rows, chunk)` buffer and its layers.

  Which layer a row belongs to, and how much of it is padding, is computed in the
  graph from the layers' first rows (a binary search over a `(num_layers,)`
  constant) rather than given as a `(rows, chunk)` mask constant, which XLA would
  compile into the executable (the `(rows,)` row-to-layer map may be folded into a
  small constant).

  Args:
    layout: the state's layout.
    g: which of its buffers.
  """

  def __init__(self, layout: LayerLayout, g: int):
    self.num_layers = len(layout.groups[g])
    self.sizes = layout.sizes(g)
    leaf_rows = layout.leaf_rows(g)
    starts = np.cumsum(leaf_rows) - leaf_rows
    rows = jax.lax.iota(jnp.int32, layout.rows(g))
    self._row_segment = (
      jnp.searchsorted(jnp.asarray(starts, jnp.int32), rows, side='right', method='scan_unrolled')
      - 1
    ).astype(jnp.int32)
    self._padded = bool(np.any(self.sizes % layout.chunk) or np.any(self.sizes == 0))
    if self._padded:
      first = rows - jnp.asarray(starts, jnp.int32)[self._row_segment]
      filled = jnp.asarray(self.sizes, jnp.int32)[self._row_segment] - first * layout.chunk
      columns = jax.lax.iota(jnp.int32, layout.chunk)
      self.valid = columns[None, :] < jnp.clip(filled, 0, layout.chunk)[:, None]

  def mask(self, x: jax.Array, fill: jax.typing.ArrayLike) -> jax.Array:
    """`x` with the padding elements replaced by `fill`."""
    return jnp.where(self.valid, x, fill) if self._padded else x

  def rows(self, per_layer: jax.Array) -> jax.Array:
    """`(num_layers, ...)` values → `(rows, 1, ...)`, broadcastable against the buffer."""
    return jnp.expand_dims(per_layer[self._row_segment], 1)

  def reduce(self, *reductions: tuple[str, jax.Array]) -> tuple[jax.Array, ...]:
    """Per-layer `'sum'`, `'min'` or `'max'` of buffers, all in one pass; padding excluded.

    One variadic reduction over the rows computes every `(kind, buffer)` pair at
    once (and keeps XLA:CPU from materializing each masked operand for a library
    reduction of its own); a segment reduction over the rows finishes each.

    Returns:
      One `(num_layers,)` array per pair, in the buffers' dtypes.
    """
    kinds = [kind for kind, _ in reductions]
    inits = [_IDENTITY[kind](x.dtype) for kind, x in reductions]
    operands = [self.mask(x, i) for (_, x), i in zip(reductions, inits, strict=True)]

    def combine(a, b):
      return tuple(_COMBINE[k](u, v) for k, u, v in zip(kinds, a, b, strict=True))

    per_row = jax.lax.reduce(tuple(operands), tuple(inits), combine, (1,))
    # One segment reduction per dtype for the sums and one for the extremes (a maximum
    # is the negated minimum of the negated values, exactly): fewer scatter kernels.
    batches: dict[tuple[str, Any], list[int]] = {}
    for j, (k, r) in enumerate(zip(kinds, per_row, strict=True)):
      batches.setdefault(('sum' if k == 'sum' else 'min', r.dtype), []).append(j)
    out: list[Any] = [None] * len(kinds)
    for (family, _), members in batches.items():
      flip = [kinds[j] == 'max' for j in members]
      columns = [-per_row[j] if f else per_row[j] for j, f in zip(members, flip, strict=True)]
      ids = self._row_segment
      if family == 'min':
        # A fence keeps XLA:CPU's opt-in multi-output fusion from merging this scatter
        # with the sums' (same ids), a kernel its code generator aborts on (jaxlib 0.10.2).
        ids = jax.lax.optimization_barrier(ids)
      reduced = _SEGMENT[family](
        jnp.stack(columns, -1), ids, self.num_layers, indices_are_sorted=True
      )
      for col, (j, f) in enumerate(zip(members, flip, strict=True)):
        out[j] = -reduced[:, col] if f else reduced[:, col]
    return tuple(out)

  def counts(self, assignment: jax.Array) -> jax.Array:
    """int32 `(num_layers, 3)`: elements per cluster of each layer, padding excluded."""
    neg, pos = self.reduce(
      ('sum', (assignment == ternary.NEG).astype(jnp.int32)),
      ('sum', (assignment == ternary.POS).astype(jnp.int32)),
    )
    return jnp.stack([neg, jnp.asarray(self.sizes, jnp.int32) - neg - pos, pos], axis=-1)


_IDENTITY = {
  'sum': lambda dtype: jnp.zeros((), dtype),
  'min': lambda dtype: jnp.array(jnp.inf, dtype),
  'max': lambda dtype: jnp.array(-jnp.inf, dtype),
}
_COMBINE = {'sum': jax.lax.add, 'min': jax.lax.min, 'max': jax.lax.max}
_SEGMENT = {'sum': jax.ops.segment_sum, 'min': jax.ops.segment_min}


def _levels(segments: Segments, centroids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(w_p, w_n)` of each element's layer, as `(rows, 1)` arrays."""
  c = segments.rows(centroids)
  return c[..., 0], c[..., 1]


def _distances(w: jax.Array, w_p: jax.Array, w_n: jax.Array) -> tuple[jax.Array, ...]:
  """`(W − c)²` for `c ∈ (−w_n, 0, +w_p)`, three buffers (as `ternary.distances`)."""
  return jnp.square(w + w_n), jnp.square(w), jnp.square(w - w_p)


def nearest(segments: Segments, w: jax.Array, centroids: jax.Array) -> jax.Array:
  """`ternary.nearest` of every layer of a buffer; padding is assigned to zero."""
  w_p, w_n = _levels(segments, centroids)
  a = ternary.argmin3(_distances(w.astype(jnp.float32), w_p, w_n))
  return segments.mask(a, jnp.asarray(ternary.ZERO, a.dtype))


def initial_centroids(segments: Segments, w: jax.Array, scale: jax.typing.ArrayLike) -> jax.Array:
  """`ternary.initial_centroids` of every layer: float32 `(num_layers, 2)`."""
  w = w.astype(jnp.float32)
  w_min, w_max = segments.reduce(('min', w), ('max', w))
  return ternary.centroids_from_extremes(w_min, w_max, scale)


class LatentStatistics(NamedTuple):
  """What a step needs to know of each layer's latent weights, float32 `(num_layers,)` each.

  Attributes:
    floor: `ternary.centroid_floor`, the lower bound of both centroids.
    w_min: the smallest weight (for `ternary.lambda_max`).
    w_max: the largest weight.
  """

  floor: jax.Array
  w_min: jax.Array
  w_max: jax.Array


def latent_statistics(
  segments: Segments, w: jax.Array, floor_factor: jax.typing.ArrayLike
) -> LatentStatistics:
  """The `LatentStatistics` of every layer of a buffer, in two passes over it."""
  w = w.astype(jnp.float32)
  total, w_min, w_max = segments.reduce(('sum', w), ('min', w), ('max', w))
  mean = total / segments.sizes.astype(np.float32)
  (deviations,) = segments.reduce(('sum', jnp.square(w - segments.rows(mean))))
  floor = ternary.floor_from_deviations(deviations, segments.sizes, floor_factor)
  return LatentStatistics(floor, w_min, w_max)


class Assignment(NamedTuple):
  """`ternary.Assignment` of every layer of a buffer.

  Attributes:
    assignment: int8 `(rows, chunk)`; padding is 1 (zero).
    pmf: float32 `(num_layers, 3)`.
    lam: float32 `(num_layers,)`.
  """

  assignment: jax.Array
  pmf: jax.Array
  lam: jax.Array


def assign(
  segments: Segments,
  w: jax.Array,
  centroids: jax.Array,
  stats: LatentStatistics,
  *,
  gamma: jax.typing.ArrayLike,
  delta: jax.Array,
  p0_min: jax.typing.ArrayLike,
  reference_parity: bool,
) -> Assignment:
  """`ternary.assign` of every layer of a buffer (docs/algorithm.md §4).

  Args:
    segments: the buffer's layers.
    w: latent weights `(rows, chunk)`.
    centroids: `(num_layers, 2)`.
    stats: `latent_statistics` of `w` (its extremes give `Λ_max`).
    gamma: the entropy gain.
    delta: `(num_layers,)` per-layer scaling `δ_l`.
    p0_min: floor of the zero cluster's probability.
    reference_parity: reproduce the original's probability arithmetic.
  """
  w = w.astype(jnp.float32)
  w_p, w_n = _levels(segments, centroids)
  d = _distances(w, w_p, w_n)
  pre = segments.mask(ternary.argmin3(d), jnp.asarray(ternary.ZERO, ternary.ASSIGNMENT_DTYPE))
  pmf = ternary.pmf_from_counts(
    segments.counts(pre), segments.sizes, p0_min=p0_min, reference_parity=reference_parity
  )
  info = ternary.information(pmf)
  lam_max = ternary.lambda_max_from_extremes(stats.w_min, stats.w_max, centroids, info)
  lam = ternary.multiplier(gamma, delta, lam_max)
  cost = segments.rows(lam[:, None] * info)  # (rows, 1, 3): λ_l·I_c of each element's layer.
  a = ternary.argmin3([d[k] + cost[..., k] for k in range(3)])
  return Assignment(segments.mask(a, jnp.asarray(ternary.ZERO, a.dtype)), pmf, lam)


def map_gradient(
  segments: Segments,
  grad: jax.Array,
  assignment: jax.Array,
  centroids: jax.Array,
  *,
  reference_parity: bool,
  prune: bool,
  also: Sequence[tuple[str, jax.Array]] = (),
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, ...]]:
  """`ternary.map_gradient` of every layer: latent gradient `(rows, chunk)`, centroid `(n, 2)`.

  `also`: further `(kind, buffer)` reductions for `Segments.reduce`, computed in the
  same pass over the buffer as the centroid gradients (no kernel of their own);
  their per-layer results come third.
  """
  g = grad.astype(jnp.float32)
  is_pos = assignment == ternary.POS
  is_neg = assignment == ternary.NEG
  g_wp, sum_neg, *extra = segments.reduce(
    ('sum', jnp.where(is_pos, g, 0.0)), ('sum', jnp.where(is_neg, g, 0.0)), *also
  )
  g_wn = sum_neg if reference_parity else -sum_neg
  if prune and not reference_parity:
    latent = g
  else:
    w_p, w_n = _levels(segments, centroids)
    latent = jnp.where(is_pos, w_p * g, jnp.where(is_neg, w_n * g, g))
  return latent, jnp.stack([g_wp, g_wn], axis=-1), tuple(extra)


def kernel(
  segments: Segments,
  assignment: jax.Array,
  centroids: jax.Array,
  latent: jax.Array,
  dtype: jax.typing.DTypeLike,
  *,
  prune: bool,
) -> jax.Array:
  """The buffer of kernels: `ternary.ternary_kernel` (or `pruned_kernel`) of every layer."""
  if prune:
    return ternary.pruned_kernel(assignment, latent, dtype)
  w_p, w_n = _levels(segments, centroids.astype(dtype))
  zero = jnp.zeros((), dtype)
  return jnp.where(assignment == ternary.POS, w_p, jnp.where(assignment == ternary.NEG, -w_n, zero))
