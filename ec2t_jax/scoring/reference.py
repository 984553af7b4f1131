"""The ``'reference'`` rule set: the published MicroNet counter of EC2T, quirks included.

docs/scoring.md lists the rules and, under "The published counter's quirks",
each quirk this reproduces: a dead channel is a filter that *sums* to zero;
dead inputs are the dead outputs of the previous convolution in the list of
body convolutions (the residual path is ignored, the stem's dead outputs reach
no layer); only the last residual addition counts; 1x1 projection shortcuts,
pooling and the classifier's ReLU are not counted; the adder tree starts at
``vl - 1`` and stops at ``n > 1`` with the layer's average vector length
``vl``; the output side is ``ceil(ceil(in/stride) + 2·pad - k + 1)``; a ternary
classifier is always stored as two masks; pyramidal (MicroNet) blocks charge
their first BatchNorm and their single ReLU by the position of the convolution
in the list. Scoring parameters are truncated to integers per group (stem,
body, classifier), as published.
"""

from __future__ import annotations

import math

import numpy as np

from ec2t_jax.scoring import costs
from ec2t_jax.scoring.graph import Graph, Layer

__all__ = ['count_rows', 'params_total']


def _dead_inputs(layer: Layer, prev_dead: np.ndarray | None) -> tuple[np.ndarray | None, int]:
  """``(dead input channels or None, dead channels beyond this layer's inputs)`` (quirk 2)."""
  if prev_dead is None or not prev_dead.any():
    return None, 0
  c_in_total = layer.shape_oi[1] * layer.groups
  dead_in = np.zeros(c_in_total, bool)
  idx = np.flatnonzero(prev_dead)
  dead_in[idx[idx < c_in_total]] = True
  return dead_in, int(np.sum(idx >= c_in_total))  # The original subtracts them anyway.


def _conv_rows(
  layer: Layer,
  position: int,
  is_stem: bool,
  prev_dead: np.ndarray | None,
  *,
  pyramidal: bool,
  is_t: bool,
  w: costs.Widths,
) -> tuple[list[costs.Row], np.ndarray]:
  """The rows of one convolution of the list (layer, bias, ReLU) and its dead outputs."""
  group = 'stem' if is_stem else 'body'
  axes = tuple(range(1, len(layer.shape_oi)))
  if layer.kernel is None:
    dead_out = np.zeros(layer.c_out, bool)
  else:
    dead_out = np.sum(layer.kernel, axis=axes, dtype=np.float64) == 0
  dead_in, extra = _dead_inputs(layer, None if is_stem or layer.kind == 'depthwise' else prev_dead)
  stats = costs.kernel_stats(layer, dead_out, dead_in)
  c_in, c_out = stats.c_in - extra, stats.c_out
  k_elems = math.prod(layer.shape_oi[2:])
  N = stats.N
  if layer.kind != 'depthwise' and (dead_in is not None or extra):
    N = c_in * c_out * k_elems
  stats = stats._replace(N=N, c_in=c_in)
  density = stats.nnz / N if N else 0.0
  storage = costs.cheapest_storage(N, stats.nnz, c_out, w.storage, is_t, 2)
  vl = k_elems * density if layer.kind == 'depthwise' else k_elems * c_in * density
  side = math.ceil(math.ceil(layer.in_side / layer.stride) + 2 * layer.pad - layer.shape_oi[2] + 1)
  n_out = side * side * c_out
  mults = 2 * n_out if is_t else vl * n_out
  if is_t and w.tree:
    adds = costs.tree_bits(vl - 1, w.storage, 1) * side * side * c_out / 32
  else:
    adds = w.adds((vl - 1) * n_out)
  rows = [
    costs.layer_row(
      layer,
      stats,
      group=group,
      sparsity=1 - density,
      ternary=is_t,
      storage=storage,
      mults=w.mults(mults),
      adds=adds,
      positions=side * side,
      dead_out=int(dead_out.sum()),
      dead_in=(int(dead_in.sum()) + extra) if dead_in is not None else extra,
    )
  ]
  odd = pyramidal and not is_stem and position % 2 == 1
  if layer.folded or pyramidal:  # The second conv of a pyramidal block has its first BN too.
    rows.append(
      costs.bias_row(
        layer,
        w,
        values=(c_in + c_out) if odd else c_out,
        adds=(2 if odd else 1) * n_out,
        group=group,
      )
    )
  if (pyramidal and not odd) or (not pyramidal and layer.activation is not None):
    rows.append(
      costs.Row(
        f'relu after {layer.module}',
        'activation',
        shape=(n_out,),
        mults=w.mults(n_out),
        group=group,
      )
    )
  return rows, dead_out


def _fc_rows(layer: Layer, is_t: bool, w: costs.Widths) -> list[costs.Row]:
  """The classifier's row (rule 8) and its bias's row."""
  c_out, c_in = layer.shape_oi[:2]
  N = c_out * c_in
  nnz = N if layer.kernel is None else int(np.count_nonzero(layer.kernel))
  density = nnz / N
  if is_t:  # The published counter stores a ternary classifier as two masks, always.
    storage = ('two-masks', 2 * N / 32 + 2 * w.storage / 32)
  else:
    storage = costs.cheapest_storage(N, nnz, c_out, w.storage, False, 2)
  n = layer.positions
  rows = [
    costs.layer_row(
      layer,
      costs.KernelStats(keep=None, N=N, nnz=nnz, c_in=c_in, c_out=c_out),  # No dead channels here.
      group='fc',
      sparsity=1 - density,
      ternary=is_t,
      storage=storage,
      mults=w.mults(c_in * density * c_out * n),
      adds=w.adds((c_in * density - 1) * c_out * n),
      positions=n,
    )
  ]
  if layer.has_bias:
    rows.append(costs.bias_row(layer, w, values=c_out, adds=c_out * n, group='fc'))
  return rows


def count_rows(graph: Graph, ternary: dict[int, bool], w: costs.Widths) -> list[costs.Row]:
  """Rows of the stem and the body convolutions, then the classifier, then the last skip.

  The arguments are those of `ec2t_jax.scoring.corrected.count_rows`.
  """
  rows: list[costs.Row] = []
  convs = [layer for layer in graph.layers if layer.kind != 'dense']
  stem = convs[0] if convs else None
  body = [c for c in convs[1:] if not c.projection]
  pyramidal = any(c.after_affine for c in body)
  prev_dead: np.ndarray | None = None
  for position, layer in [(0, stem), *enumerate(body)] if stem else []:
    is_stem = layer is stem
    layer_rows, dead_out = _conv_rows(
      layer,
      position,
      is_stem,
      prev_dead,
      pyramidal=pyramidal,
      is_t=ternary[layer.index],
      w=w,
    )
    rows.extend(layer_rows)
    prev_dead = None if is_stem else dead_out
  for layer in graph.layers:
    if layer.kind == 'dense':
      rows.extend(_fc_rows(layer, ternary[layer.index], w))
    elif layer.projection and layer is not stem:
      rows.append(
        costs.Row(
          layer.name, layer.kind, shape=layer.kernel_shape, group='projection', counted=False
        )
      )
  residuals = [op for op in graph.ops if op.kind == 'residual']
  if residuals:  # The published counter keeps only the last block's skip addition.
    last = residuals[-1]
    rows.append(
      costs.Row(
        'skip addition (last block only)',
        'residual',
        shape=(last.size,),
        adds=w.adds(last.size),
        group='body',
      )
    )
  return rows


def params_total(rows: list[costs.Row]) -> float:
  """The rows' scoring parameters, truncated to an integer per group, as published."""
  groups: dict[str, float] = {}
  for r in rows:
    groups[r.group] = groups.get(r.group, 0.0) + r.params
  return float(sum(math.floor(v + 1e-9) for v in groups.values()))
