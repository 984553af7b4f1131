"""The ``'corrected'`` rule set: every operation of the network, counted honestly.

Per layer (docs/scoring.md, rules 1-8 and their *Corrected* notes): a dead
channel is an all-zero filter over the live inputs, and identically-zero
channels are followed through the true data flow (`Layer.zero_in`); a ternary
filter with ``n+`` positive and ``n-`` negative taps costs one multiplication
per non-empty sign group and two true adder trees (``m - 1`` additions for
``m`` values, widening by one bit per level) plus one combining addition per
output; a BatchNorm scale folded into a ternary layer makes its two centroids
per-channel values. Every other traced operation (residual additions,
projection shortcuts, pooling, activations, standalone BatchNorm) is a row of
its own. Scoring parameters are summed exactly.
"""

from __future__ import annotations

import math

import numpy as np

from ec2t_jax.scoring import costs
from ec2t_jax.scoring.graph import Graph, Layer, module_of

__all__ = ['count_rows', 'params_total']


def _group(layer: Layer, first_conv: int | None) -> str:
  if layer.kind == 'dense':
    return 'fc'
  if layer.index == first_conv:
    return 'stem'
  return 'projection' if layer.projection else 'body'


def _layer_rows(layer: Layer, group: str, is_t: bool, w: costs.Widths) -> list[costs.Row]:
  """The layer's row and its folded bias's row."""
  zero_filters = layer.zero_filters()
  dead_out = np.zeros(layer.c_out, bool) if zero_filters is None else zero_filters
  stats = costs.kernel_stats(layer, dead_out, layer.zero_in)
  positions = layer.positions
  n_centroids = 2 * stats.c_out if is_t and layer.has_scale else 2
  storage = costs.cheapest_storage(stats.N, stats.nnz, stats.c_out, w.storage, is_t, n_centroids)
  if layer.kernel is None:  # Abstract: a dense full-precision kernel.
    per_filter = np.full(stats.c_out, math.prod(layer.shape_oi[1:]), float)
    mults = float(per_filter.sum()) * positions
    adds = w.adds(float(np.sum(per_filter - 1)) * positions)
  else:
    keep = stats.keep.reshape(stats.keep.shape + (1,) * (layer.kernel.ndim - 2))
    kept = np.where(keep, layer.kernel, 0.0)
    axes = tuple(range(1, kept.ndim))
    n_pos = np.sum(kept > 0, axis=axes)[~dead_out]
    n_neg = np.sum(kept < 0, axis=axes)[~dead_out]
    if is_t:  # One product per non-empty sign group; a tree per sign group plus one addition.
      mults = float(np.sum((n_pos > 0).astype(int) + (n_neg > 0))) * positions
      if w.tree:
        bits = sum(
          costs.tree_bits(p, w.storage, 1)
          + costs.tree_bits(q, w.storage, 1)
          + (w.add if p and q else 0)
          for p, q in zip(n_pos.tolist(), n_neg.tolist(), strict=True)
        )
        adds = bits * positions / 32
      else:
        adds = w.adds(float(np.sum(np.maximum(n_pos + n_neg - 1, 0))) * positions)
    else:
      nz = n_pos + n_neg
      mults = float(nz.sum()) * positions
      adds = w.adds(float(np.sum(np.maximum(nz - 1, 0))) * positions)
  rows = [
    costs.layer_row(
      layer,
      stats,
      group=group,
      sparsity=1 - stats.nnz / stats.N if stats.N else 0.0,
      ternary=is_t,
      storage=storage,
      mults=w.mults(mults),
      adds=adds,
      positions=positions,
      dead_out=int(dead_out.sum()),
      dead_in=layer.shape_oi[1] * layer.groups - stats.c_in if layer.kind != 'depthwise' else 0,
    )
  ]
  if layer.has_bias:
    rows.append(
      costs.bias_row(
        layer,
        w,
        values=stats.c_out,
        adds=positions * stats.c_out,
        group=group,
        c_out=stats.c_out,
      )
    )
  return rows


def count_rows(graph: Graph, ternary: dict[int, bool], w: costs.Widths) -> list[costs.Row]:
  """Rows of every layer (with its folded bias) in call order, then of every other op.

  Args:
    graph: the traced network.
    ternary: per layer index, whether the layer is ternary.
    w: the bit widths.
  """
  first_conv = next((i.index for i in graph.layers if i.kind != 'dense'), None)
  rows: list[costs.Row] = []
  for layer in graph.layers:
    rows.extend(_layer_rows(layer, _group(layer, first_conv), ternary[layer.index], w))
  for op in graph.ops:
    src = graph.layers[op.src].name if op.src is not None else 'input'
    rows.append(
      costs.Row(
        f'{op.primitive} after {module_of(src)}',
        op.kind,
        shape=(op.size,),
        params=w.stored(op.params),
        mults=w.mults(op.mults),
        adds=w.adds(op.adds),
        positions=op.size,
        counted=op.kind != 'uncounted',
      )
    )
  return rows


def params_total(rows: list[costs.Row]) -> float:
  """The exact sum of the rows' scoring parameters."""
  return float(sum(r.params for r in rows))
