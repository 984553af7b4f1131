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

  def row_segment(self, g: int) -> np.ndarray:
    """int32 `(rows,)`: the layer (index within buffer `g`) each row belongs to."""
    return np.repeat(np.arange(len(self.groups[g]), dtype=np.int32), self.leaf_rows(g))

  def row_valid(self, g: int) -> np.ndarray:
    """int32 `(rows,)`: how many leading elements of each row are weights, not padding."""
    sizes, rows = self.sizes(g), self.leaf_rows(g)
    start = np.cumsum(rows) - rows
    used = np.zeros(self.rows(g), np.int64)
    for k in range(len(sizes)):
      row = np.arange(rows[k])
      used[start[k] : start[k] + rows[k]] = np.clip(sizes[k] - row * self.chunk, 0, self.chunk)
    return used.astype(np.int32)

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

  def unflatten(self, buffers: Sequence[Any]) -> Any:
    """The params-shaped tree of `buffers` (placeholders where other transformations own leaves)."""
    leaves: list[Any] = [optax.MaskedNode()] * self.treedef.num_leaves
    for g, (members, buffer) in enumerate(zip(self.groups, buffers, strict=True)):
      start = 0
      for i, shape, rows in zip(members, self.shapes[g], self.leaf_rows(g), strict=True):
        if isinstance(buffer, jax.ShapeDtypeStruct):  # An abstract state (`jax.eval_shape`).
          leaves[i] = jax.ShapeDtypeStruct(shape, buffer.dtype)
        else:
          flat = buffer[start : start + int(rows)].reshape(-1)
          leaves[i] = flat[: _size(shape)].reshape(shape)
        start += int(rows)
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
  """The reductions and broadcasts between a `(rows, chunk)` buffer and its layers."""

  def __init__(self, layout: LayerLayout, g: int):
    self.num_layers = len(layout.groups[g])
    self.sizes = layout.sizes(g)
    self._row_segment = layout.row_segment(g)
    valid = np.arange(layout.chunk)[None, :] < layout.row_valid(g)[:, None]
    self._padded = not valid.all()
    self.valid = jnp.asarray(valid) if self._padded else None

  def mask(self, x: jax.Array, fill: jax.typing.ArrayLike) -> jax.Array:
    """`x` with the padding elements replaced by `fill`."""
    return jnp.where(self.valid, x, fill) if self._padded else x

  def rows(self, per_layer: jax.Array) -> jax.Array:
    """`(num_layers, ...)` values → `(rows, 1, ...)`, broadcastable against the buffer."""
    return jnp.expand_dims(per_layer[self._row_segment], 1)

  def sum(self, x: jax.Array) -> jax.Array:
    """Per-layer sums of a buffer `(rows, chunk, ...)` whose padding holds zeros."""
    return jax.ops.segment_sum(
      jnp.sum(x, axis=1), self._row_segment, self.num_layers, indices_are_sorted=True
    )

  def min(self, x: jax.Array) -> jax.Array:
    """Per-layer minima of a buffer, padding excluded."""
    return jax.ops.segment_min(
      jnp.min(self.mask(x, jnp.inf), axis=1),
      self._row_segment,
      self.num_layers,
      indices_are_sorted=True,
    )

  def max(self, x: jax.Array) -> jax.Array:
    """Per-layer maxima of a buffer, padding excluded."""
    return -self.min(-x)

  def counts(self, assignment: jax.Array) -> jax.Array:
    """int32 `(num_layers, 3)`: elements per cluster of each layer, padding excluded."""
    a = self.mask(assignment, jnp.asarray(-1, assignment.dtype))  # Padding joins no cluster.
    return self.sum((a[..., None] == jnp.arange(3, dtype=a.dtype)).astype(jnp.int32))


def _levels(segments: Segments, centroids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(w_p, w_n)` of each element's layer, as `(rows, 1)` float32."""
  c = segments.rows(centroids)
  return c[..., 0], c[..., 1]


def _distances(w: jax.Array, w_p: jax.Array, w_n: jax.Array) -> jax.Array:
  """`(3, rows, chunk)`: `(W − c)²` for `c ∈ (−w_n, 0, +w_p)` (as `ternary.distances`)."""
  zero = jnp.zeros_like(w_p)
  return jnp.stack([jnp.square(w - lv) for lv in (-w_n, zero, w_p)])


def nearest(segments: Segments, w: jax.Array, centroids: jax.Array) -> jax.Array:
  """`ternary.nearest` of every layer of a buffer; padding is assigned to zero."""
  w_p, w_n = _levels(segments, centroids)
  a = ternary.argmin3(_distances(w.astype(jnp.float32), w_p, w_n))
  return segments.mask(a, jnp.asarray(ternary.ZERO, a.dtype))


def initial_centroids(segments: Segments, w: jax.Array, scale: jax.typing.ArrayLike) -> jax.Array:
  """`ternary.initial_centroids` of every layer: float32 `(num_layers, 2)`."""
  w = w.astype(jnp.float32)
  return ternary.centroids_from_extremes(segments.min(w), segments.max(w), scale)


def centroid_floor(segments: Segments, w: jax.Array, factor: jax.typing.ArrayLike) -> jax.Array:
  """`ternary.centroid_floor` of every layer: float32 `(num_layers,)`."""
  w = w.astype(jnp.float32)
  mean = segments.sum(w) / segments.sizes.astype(np.float32)
  deviations = segments.mask(jnp.square(w - segments.rows(mean)), 0.0)
  return ternary.floor_from_deviations(segments.sum(deviations), segments.sizes, factor)


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
    gamma: the entropy gain.
    delta: `(num_layers,)` per-layer scaling `δ_l`.
    p0_min: floor of the zero cluster's probability.
    reference_parity: reproduce the original's probability arithmetic.
  """
  w = w.astype(jnp.float32)
  w_p, w_n = _levels(segments, centroids)
  d = _distances(w, w_p, w_n)
  pre = ternary.argmin3(d)
  pmf = ternary.pmf_from_counts(
    segments.counts(pre), segments.sizes, p0_min=p0_min, reference_parity=reference_parity
  )
  info = ternary.information(pmf)
  lam_max = ternary.lambda_max_from_extremes(segments.min(w), segments.max(w), centroids, info)
  lam = ternary.multiplier(gamma, delta, lam_max)
  cost = segments.rows(lam[:, None] * info)  # (rows, 1, 3): λ_l·I_c of each element's layer.
  a = ternary.argmin3(d + jnp.moveaxis(cost, -1, 0))
  return Assignment(segments.mask(a, jnp.asarray(ternary.ZERO, a.dtype)), pmf, lam)


def map_gradient(
  segments: Segments,
  grad: jax.Array,
  assignment: jax.Array,
  centroids: jax.Array,
  *,
  reference_parity: bool,
  prune: bool,
) -> tuple[jax.Array, jax.Array]:
  """`ternary.map_gradient` of every layer: latent gradient `(rows, chunk)`, centroid `(n, 2)`."""
  g = grad.astype(jnp.float32)
  is_pos = assignment == ternary.POS
  is_neg = assignment == ternary.NEG
  sums = segments.sum(jnp.stack([jnp.where(is_pos, g, 0.0), jnp.where(is_neg, g, 0.0)], -1))
  g_wp, sum_neg = sums[:, 0], sums[:, 1]
  g_wn = sum_neg if reference_parity else -sum_neg
  if prune and not reference_parity:
    latent = g
  else:
    w_p, w_n = _levels(segments, centroids)
    latent = jnp.where(is_pos, w_p * g, jnp.where(is_neg, w_n * g, g))
  return latent, jnp.stack([g_wp, g_wn], axis=-1)


def kernel(
  assignment: jax.Array,
  segments: Segments,
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
