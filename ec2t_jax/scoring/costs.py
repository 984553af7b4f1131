"""What both counting rule sets share: bit widths, report rows, storage formats, adder trees.

Costs are in 32-bit equivalents: an item of ``b`` bits counts ``b/32``
(docs/scoring.md, "Units and constants"). `corrected` and `reference` build
their layer rows with `layer_row` and their bias rows with `bias_row`, price a
kernel's storage with `cheapest_storage` (rule 3) and ternary additions with
`tree_bits` (rule 5).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from ec2t_jax.scoring.graph import LAYER_KINDS, Layer

__all__ = [
  'KernelStats',
  'Report',
  'Row',
  'Widths',
  'bias_row',
  'cheapest_storage',
  'kernel_stats',
  'layer_row',
  'totals',
  'tree_bits',
]


@dataclasses.dataclass(frozen=True)
class Widths:
  """The bit widths of a count.

  Attributes:
    storage: bits of a stored value (``b``: ``storage_bits``, or 32 without
      half precision).
    mul: bits of a multiplication.
    add: bits of an accumulation.
    tree: count ternary additions as an adder tree (rule 5).
  """

  storage: int
  mul: int
  add: int
  tree: bool

  def stored(self, n: float) -> float:
    """``n`` stored values in 32-bit equivalents."""
    return n * self.storage / 32

  def mults(self, n: float) -> float:
    """``n`` multiplications in 32-bit equivalents."""
    return n * self.mul / 32

  def adds(self, n: float) -> float:
    """``n`` additions in 32-bit equivalents."""
    return n * self.add / 32


@dataclasses.dataclass
class Row:
  """One line of a `Report`; costs in 32-bit equivalents.

  Layer rows (kind ``'conv'``, ``'depthwise'``, ``'dense'``) describe the
  weights and the multiply-accumulates of one layer; the bias (folded
  BatchNorm) and the activation of a layer, residual additions, pooling,
  standalone affine ops and matmuls between activations get rows of their own.

  Attributes:
    name: kernel path, or ``'<layer> (bias)'``, ``'relu after <layer>'``, ...
    kind: ``'conv'``, ``'depthwise'``, ``'dense'``, ``'bias'``, ``'activation'``,
      ``'residual'``, ``'pool'``, ``'affine'``, ``'matmul'``, ``'add'``,
      ``'compare'``, ``'scale'``.
    shape: the kernel shape as stored (layer rows), or the output shape.
    N: kernel elements after removing dead channels.
    nnz: non-zero elements of those.
    sparsity: ``1 - nnz/N``: the zeros among the live elements (what the costs count).
      It differs from ``kernel_sparsity`` when channels are dead: a dead (all-zero)
      filter takes its zeros out of the count.
    ternary: the kernel is ternary (values or mask).
    params: scoring parameters.
    mults: multiplications (weighted by ``mul_bits/32``).
    adds: additions (``add_bits/32``, or the adder tree's bits / 32).
    dead_out: dead output channels removed.
    dead_in: dead input channels removed.
    c_in: input channels after removal.
    c_out: output channels after removal.
    positions: output positions per filter.
    storage: the cheapest storage format of the layer (``'sparse-fp'``,
      ``'dense-fp'``, ``'two-masks'``, ``'mask+sign'``, ``'csr'``, ``'cer'``).
    group: ``'stem'``, ``'body'``, ``'fc'``, ``'projection'``, ``'other'``
      (reference mode truncates scoring params per group).
    counted: False for what the reference mode leaves out.
    kernel_sparsity: zeros / all elements of the kernel as stored, dead channels
      included: the per-layer sparsity of ``summary.json`` and ``report.md``.
  """

  name: str
  kind: str
  shape: tuple[int, ...] = ()
  N: int = 0
  nnz: int = 0
  sparsity: float = 0.0
  ternary: bool = False
  params: float = 0.0
  mults: float = 0.0
  adds: float = 0.0
  dead_out: int = 0
  dead_in: int = 0
  c_in: int = 0
  c_out: int = 0
  positions: int = 0
  storage: str = ''
  group: str = 'other'
  counted: bool = True
  kernel_sparsity: float = 0.0


@dataclasses.dataclass
class Report:
  """The result of `ec2t_jax.scoring.count`.

  Attributes:
    rows: per-layer and per-op costs.
    totals: ``params``, ``mults``, ``adds``, ``flops`` (32-bit equivalents),
      ``score``, ``P_ref``, ``F_ref``, and ``macs`` (plain multiply-accumulates
      of the layers, for reference).
    mode: ``'corrected'`` or ``'reference'``.
    settings: the bit widths and switches used.
    warnings: traced operations that could not be counted exactly.
  """

  rows: list[Row]
  totals: dict[str, float]
  mode: str
  settings: dict[str, Any]
  warnings: list[str] = dataclasses.field(default_factory=list)

  @property
  def layer_rows(self) -> list[Row]:
    """The rows of convolutions and dense layers, in call order."""
    return [r for r in self.rows if r.kind in LAYER_KINDS]

  def as_dict(self) -> dict[str, Any]:
    """The report as plain data: ``mode``, ``settings``, ``totals``, ``rows``, ``warnings``."""
    return {
      'mode': self.mode,
      'settings': dict(self.settings),
      'totals': self.totals,
      'rows': [dataclasses.asdict(r) for r in self.rows],
      'warnings': self.warnings,
    }

  def format(self) -> str:
    """A fixed-width table of the layers, the other ops by kind, and the totals.

    A layer has two sparsities: ``sparsity`` over all the weights of its kernel
    (`Row.kernel_sparsity`, as ``summary.json`` and ``report.md`` give it) and
    ``sp. live`` over the ``N live`` weights left after removing its dead channels
    (`Row.sparsity`, what the costs count); a line under the totals says so.
    """
    head = (
      f'{"layer":<34} {"kind":<9} {"weights":>9} {"sparsity":>8} {"N live":>9} {"sp. live":>8} '
      f'{"T":>1} {"storage":>9} {"params":>10} {"mults":>12} {"adds":>12} {"dead o/i":>9}'
    )
    lines = [head, '-' * len(head)]
    for r in self.layer_rows:
      name = r.name if r.counted else f'({r.name})'
      lines.append(
        f'{name[-34:]:<34} {r.kind:<9} {math.prod(r.shape):>9,d} {100 * r.kernel_sparsity:>7.1f}% '
        f'{r.N:>9,d} {100 * r.sparsity:>7.1f}% '
        f'{"T" if r.ternary else "-":>1} {r.storage:>9} {r.params:>10,.1f} {r.mults:>12,.0f} '
        f'{r.adds:>12,.0f} {f"{r.dead_out}/{r.dead_in}":>9}'
      )
    by_kind: dict[str, list[float]] = {}
    for r in self.rows:
      if r.kind in LAYER_KINDS or not r.counted:
        continue
      acc = by_kind.setdefault(r.kind, [0.0, 0.0, 0.0, 0])
      acc[0] += r.params
      acc[1] += r.mults
      acc[2] += r.adds
      acc[3] += 1
    lines.append('-' * len(head))
    for kind, (p, m, a, n) in sorted(by_kind.items()):
      label = f'{kind} ({n} ops)'
      lines.append(
        f'{label:<34} {"":<9} {"":>9} {"":>8} {"":>1} {"":>9} {p:>10,.1f} {m:>12,.0f} {a:>12,.0f}'
      )
    t = self.totals
    lines.append('-' * len(head))
    if math.isnan(t['score']):
      dataset = self.settings.get('dataset')
      score = (
        f'no score: the MicroNet challenge has no reference network for dataset {dataset!r} '
        '(only CIFAR and ImageNet)'
      )
    else:
      score = f'score {t["score"]:.5f} (P_ref {t["P_ref"]:.3g}, F_ref {t["F_ref"]:.4g})'
    lines.append(
      f'total ({self.mode}): params {t["params"]:,.0f}, mults {t["mults"] / 1e6:.3f}M, '
      f'adds {t["adds"] / 1e6:.3f}M, FLOPs {t["flops"] / 1e6:.3f}M, {score}'
    )
    lines.append(
      'sparsity: zeros / weights of the whole kernel (as in summary.json and report.md); '
      'sp. live: zeros among the N live weights left after removing dead channels (dead o/i), '
      'which the costs count'
    )
    for w in self.warnings:
      lines.append(f'warning: {w}')
    return '\n'.join(lines)


class KernelStats(NamedTuple):
  """A kernel restricted to its live (output, input) channel pairs (docs/scoring.md, rule 2).

  Attributes:
    keep: bool ``(out, in per group)``: the kernel columns that count.
    N: kernel elements that count.
    nnz: the non-zeros among them.
    c_in: live input channels.
    c_out: live output channels.
  """

  keep: np.ndarray | None
  N: int
  nnz: int
  c_in: int
  c_out: int


def kernel_stats(layer: Layer, dead_out: np.ndarray, dead_in: np.ndarray | None) -> KernelStats:
  """The `KernelStats` of ``layer`` without its dead output and input channels.

  Args:
    layer: a traced layer.
    dead_out: bool per output channel.
    dead_in: bool per input channel of the layer, or None (none dead).
  """
  c_out_total, i_per_group = layer.shape_oi[:2]
  k_elems = math.prod(layer.shape_oi[2:])
  keep_out = ~dead_out
  if dead_in is None:
    keep_cols = np.ones((c_out_total, i_per_group), bool)
    dead_in_count = 0
  else:
    keep_cols = ~dead_in[layer.input_channel_index()]
    dead_in_count = int(dead_in.sum())
  keep = keep_cols & keep_out[:, None]
  c_out = int(keep_out.sum())
  if layer.kind == 'depthwise':
    N = c_out * k_elems
    c_in = c_out
  else:
    c_in = i_per_group * layer.groups - dead_in_count
    N = int(keep.sum()) * k_elems if dead_in is not None else c_out * i_per_group * k_elems
  if layer.kernel is None:
    nnz = N
  else:
    nz = layer.kernel != 0
    nnz = int(np.sum(nz & keep.reshape(keep.shape + (1,) * (nz.ndim - 2))))
  return KernelStats(keep, N, nnz, c_in, c_out)


def cheapest_storage(
  N: float, nnz: float, c_out: int, b: int, ternary: bool, n_cent: int
) -> tuple[str, float]:
  """``(format, scoring params)`` of the cheapest storage format (docs/scoring.md, rule 3).

  Args:
    N: kernel elements.
    nnz: non-zeros among them.
    c_out: output channels (CSR/CER row pointers).
    b: bits of a stored value.
    ternary: also consider the ternary formats (two masks, mask+sign, CSR, CER).
    n_cent: centroid values stored with a ternary kernel.
  """
  formats = {'sparse-fp' if nnz < N else 'dense-fp': nnz * b / 32 + (N / 32 if nnz < N else 0.0)}
  if ternary:
    cent = n_cent * b
    formats['two-masks'] = math.ceil((2 * N + cent) / 32)
    formats['mask+sign'] = math.ceil((N + nnz + cent) / 32)
    formats['csr'] = math.ceil((nnz * (b + 1) + (c_out + 1) * b + cent) / 32)
    formats['cer'] = math.ceil((nnz * b + 2 * (c_out + 1) * b + cent) / 32)
  storage = min(formats, key=formats.get)
  return storage, formats[storage]


def tree_bits(n: float, width: int, stop: float) -> float:
  """Bits of an adder tree: ``n // 2`` additions per level, one bit wider per level (max 32)."""
  bits = 0.0
  while n > stop:
    bits += (n // 2) * width
    n = math.ceil(n / 2)
    width = min(width + 1, 32)
  return bits


def layer_row(
  layer: Layer,
  stats: KernelStats,
  *,
  group: str,
  sparsity: float,
  ternary: bool,
  storage: tuple[str, float],
  mults: float,
  adds: float,
  positions: int,
  dead_out: int = 0,
  dead_in: int = 0,
) -> Row:
  """The `Row` of a convolution or dense layer.

  Args:
    layer: the traced layer.
    stats: its kernel without dead channels.
    group: ``'stem'``, ``'body'``, ``'projection'`` or ``'fc'``.
    sparsity: the sparsity of the ``stats.N`` elements the row counts (`Row.sparsity`;
      `Row.kernel_sparsity`, over the whole kernel, comes from ``layer``).
    ternary: the kernel counts as ternary.
    storage: ``(format, scoring params)`` (see `cheapest_storage`).
    mults: multiplications in 32-bit equivalents.
    adds: additions in 32-bit equivalents.
    positions: output positions per filter.
    dead_out: dead output channels removed.
    dead_in: dead input channels removed.
  """
  kernel = layer.kernel
  return Row(
    layer.name,
    layer.kind,
    shape=layer.kernel_shape,
    kernel_sparsity=float(np.mean(kernel == 0)) if kernel is not None and kernel.size else 0.0,
    N=stats.N,
    nnz=stats.nnz,
    sparsity=sparsity,
    ternary=ternary,
    params=storage[1],
    mults=mults,
    adds=adds,
    dead_out=dead_out,
    dead_in=dead_in,
    c_in=stats.c_in,
    c_out=stats.c_out,
    positions=positions,
    storage=storage[0],
    group=group,
  )


def bias_row(
  layer: Layer, widths: Widths, *, values: int, adds: int, group: str, c_out: int = 0
) -> Row:
  """The `Row` of the bias (folded BatchNorm) of ``layer`` (docs/scoring.md, rule 6).

  Args:
    layer: the layer the bias is folded into.
    widths: the bit widths.
    values: stored bias values.
    adds: additions (raw count).
    group: the layer's group.
    c_out: the layer's live output channels, recorded in the row.
  """
  return Row(
    f'{layer.module} (bias)',
    'bias',
    shape=(values,),
    params=widths.stored(values),
    adds=widths.adds(adds),
    c_out=c_out,
    group=group,
  )


def totals(rows: list[Row], params_total: Callable[[list[Row]], float]) -> dict[str, float]:
  """``params``, ``mults``, ``adds`` and ``flops`` of the counted rows.

  Args:
    rows: a rule set's rows.
    params_total: the rule set's sum of scoring parameters (exact, or truncated per group).
  """
  counted = [r for r in rows if r.counted]
  mults = float(sum(r.mults for r in counted))
  adds = float(sum(r.adds for r in counted))
  return {'params': params_total(counted), 'mults': mults, 'adds': adds, 'flops': mults + adds}
