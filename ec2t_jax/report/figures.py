"""The report's figures (matplotlib, headless: no pyplot, no display), one PNG each.

Training curves (`plot_curves`), per-layer bars (`plot_layers`), latent-weight histograms
with the decision thresholds (`plot_histograms`), the comparison of several runs
(`plot_comparison`) and the trade-off curves of a sweep (`plot_sweep`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ec2t_jax import files
from ec2t_jax.report.runs import LayerState, RunData, _shared_fp_accuracy, decision_thresholds
from ec2t_jax.training import stages as stages_lib

_DPI = 90
_COLORS = {'neg': '#c0392b', 'zero': '#7f8c8d', 'pos': '#2471a3'}


def _save(fig: Figure, path: str) -> None:
  FigureCanvasAgg(fig)
  with files.replacing(path) as f:  # A failed write leaves an old figure whole.
    fig.savefig(f, format='png', dpi=_DPI, pil_kwargs={'optimize': True})


def _series(metrics: Sequence[Mapping[str, float]], key: str) -> tuple[np.ndarray, np.ndarray]:
  last: dict[int, float] = {}
  for row in metrics:  # A resumed run may log a step twice: the last one wins.
    if key in row and math.isfinite(row[key]):
      last[int(row['step'])] = float(row[key])
  steps = np.asarray(sorted(last), np.float64)
  return steps, np.asarray([last[int(s)] for s in steps], np.float64)


_MARK_STYLES = ('--', ':', '-.', (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))


def _mark_phases(ax: Any, phases: Mapping[str, int], *, legend: bool = False) -> None:
  for i, (label, step) in enumerate(phases.items()):
    # A stage labelled by its kind gets the kind's marker; a named one '<name> starts'.
    kind = stages_lib.KINDS.get(label)
    text = kind.marker if kind is not None else f'{label} starts'
    style = _MARK_STYLES[i % len(_MARK_STYLES)]
    ax.axvline(step, color='black', linestyle=style, linewidth=1, label=text if legend else None)


def _plot_train_val(
  ax: Any, metrics: Sequence[Mapping[str, float]], key: str, labels: tuple[str, str]
) -> tuple[np.ndarray, np.ndarray]:
  """Plots ``train/<key>`` (a line) and ``val/<key>`` (points); returns both series' values."""
  steps, train = _series(metrics, f'train/{key}')
  ax.plot(steps, train, color='#34495e', label=labels[0])
  steps, val = _series(metrics, f'val/{key}')
  if steps.size:
    ax.plot(steps, val, 'o-', color='#e67e22', markersize=3, label=labels[1])
  return train, val


def plot_curves(run: RunData, path: str) -> None:
  """Loss, accuracy, sparsity/entropy and centroids against the step (2x2)."""
  fig = Figure(figsize=(10, 6.4), layout='constrained')
  axes = fig.subplots(2, 2, sharex=True)
  m = run.metrics
  ax = axes[0, 0]
  loss, val = _plot_train_val(ax, m, 'loss', ('train loss', 'val loss'))
  values = np.concatenate([loss, val])
  if values.size and values.min() > 0 and values.max() / values.min() > 20:
    ax.set_yscale('log')
  ax.set_title('loss')
  _mark_phases(ax, run.phases, legend=True)
  ax.legend(fontsize=8)
  ax = axes[0, 1]
  acc, val = _plot_train_val(ax, m, 'accuracy', ('train', 'validation'))
  fp = run.summary.get('fp_test_accuracy')
  if fp is not None:
    ax.axhline(fp, color='#27ae60', linewidth=1, label=f'FP test {fp:.4f}')
  # Zoom past the first 5 % of training, where accuracy climbs from chance.
  late = acc[len(acc) // 20 :] if acc.size else acc
  lo = min([*late.tolist(), *val.tolist(), fp if fp is not None else 1.0, 0.9])
  ax.set_ylim(max(0.0, lo - 0.02), 1.0)
  ax.set_title('accuracy')
  _mark_phases(ax, run.phases)
  ax.legend(fontsize=8, loc='lower right')
  ax = axes[1, 0]
  ax.plot(*_series(m, 'ec2t/total_sparsity'), color='#8e44ad', label='sparsity')
  ax.set_ylim(0, 1)
  ax.set_ylabel('sparsity of ternary weights')
  twin = ax.twinx()
  twin.plot(*_series(m, 'ec2t/entropy_bits'), color='#16a085', label='entropy')
  twin.set_ylim(0, math.log2(3))
  twin.set_ylabel('entropy (bits / weight)')
  ax.set_title('sparsity and entropy of the ternary weights')
  _mark_phases(ax, run.phases)
  handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
  ax.legend(handles=handles, fontsize=8, loc='lower right')
  ax.set_xlabel('step')
  ax = axes[1, 1]
  cmap = [f'C{i}' for i in range(10)]
  for i, layer in enumerate(run.layers):
    color = cmap[i % len(cmap)]
    ax.plot(*_series(m, f'ec2t/{layer.name}/w_p'), color=color, label=layer.name)
    steps, w_n = _series(m, f'ec2t/{layer.name}/w_n')
    ax.plot(steps, -w_n, color=color, linestyle='--')
  ax.axhline(0, color='black', linewidth=0.5)
  ax.set_title('centroids: w_p (solid), -w_n (dashed)')
  ax.set_xlabel('step')
  _mark_phases(ax, run.phases)
  if run.layers:
    ax.legend(fontsize=7, ncol=2 if len(run.layers) > 6 else 1)
  fig.suptitle(f'{run.label}: training curves')
  _save(fig, path)


def plot_layers(run: RunData, path: str) -> None:
  """Per-layer sparsity and centroid values (bar charts)."""
  names = [layer.name.removesuffix('/kernel') for layer in run.layers]
  x = np.arange(len(names))
  width = max(6.0, 0.45 * len(names) + 2)
  fig = Figure(figsize=(width, 5.6), layout='constrained')
  ax_s, ax_c = fig.subplots(2, 1, sharex=True)
  sparsity = [layer.sparsity for layer in run.layers]
  bars = ax_s.bar(x, sparsity, color=_COLORS['zero'])
  if len(names) <= 24:
    ax_s.bar_label(bars, labels=[f'{100 * s:.0f}%' for s in sparsity], fontsize=8)
  ax_s.set_ylim(0, 1.08)
  ax_s.set_ylabel('sparsity')
  ax_s.set_title(f'{run.label}: per-layer sparsity (zeros / weights) and centroids')
  ax_c.bar(x - 0.2, [layer.w_p for layer in run.layers], 0.4, color=_COLORS['pos'], label='w_p')
  ax_c.bar(x + 0.2, [-layer.w_n for layer in run.layers], 0.4, color=_COLORS['neg'], label='-w_n')
  ax_c.axhline(0, color='black', linewidth=0.5)
  ax_c.set_ylabel('centroid value')
  ax_c.legend(fontsize=8)
  ax_c.set_xticks(
    x,
    names,
    rotation=45 if len(names) > 6 else 0,
    ha='right' if len(names) > 6 else 'center',
    fontsize=8,
  )
  _save(fig, path)


def _pick(layers: Sequence[LayerState], k: int) -> list[LayerState]:
  if len(layers) <= k:
    return list(layers)
  idx = np.unique(np.linspace(0, len(layers) - 1, k).round().astype(int))
  return [layers[i] for i in idx]


def plot_histograms(run: RunData, path: str, *, max_layers: int = 4) -> None:
  """Latent-weight histograms split by assignment, with the decision thresholds."""
  layers = [layer for layer in _pick(run.layers, max_layers) if layer.latent is not None]
  cols = min(len(layers), 2) or 1
  rows = max(math.ceil(len(layers) / cols), 1)
  fig = Figure(figsize=(5.2 * cols, 3.4 * rows), layout='constrained')
  axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
  for ax, layer in zip(axes, layers, strict=False):
    w = layer.latent
    lim = float(np.quantile(np.abs(w), 0.995)) * 1.15 or 1.0
    bins = np.linspace(-lim, lim, 81)
    groups = [w[layer.assignment == k] for k in (0, 1, 2)]
    ax.hist(
      groups,
      bins=bins,
      stacked=True,
      color=[_COLORS['neg'], _COLORS['zero'], _COLORS['pos']],
      label=['→ -w_n', '→ 0', '→ +w_p'],
    )
    t_n, t_p = decision_thresholds([layer.w_p, layer.w_n], layer.pmf, layer.lam)
    for t, name in ((t_n, 't_n'), (t_p, 't_p')):
      if math.isfinite(t):
        ax.axvline(t, color='black', linewidth=1.2, label=f'{name} = {t:+.3f}')
    ax.axvline(-layer.w_n / 2, color='black', linestyle=':', linewidth=1, label='±w/2 (λ = 0)')
    ax.axvline(layer.w_p / 2, color='black', linestyle=':', linewidth=1)
    ax.set_xlim(-lim, lim)
    ax.set_yscale('log')
    ax.set_title(
      f'{layer.name.removesuffix("/kernel")}: {layer.size:,d} weights, '
      f'{100 * layer.sparsity:.0f}% zero, λ = {layer.lam:.2g}',
      fontsize=9,
    )
    ax.set_xlabel('latent weight')
    ax.legend(fontsize=7)
  for ax in axes[len(layers) :]:
    ax.set_visible(False)
  fig.suptitle(f'{run.label}: latent weights by assignment, with the decision thresholds')
  _save(fig, path)


def plot_comparison(runs: Sequence[RunData], path_sparsity: str, path_size: str) -> None:
  """Test accuracy against sparsity, and against the exported size, one point per run."""
  fig = Figure(figsize=(6, 4.2), layout='constrained')
  ax = fig.subplots()
  for i, run in enumerate(runs):
    acc = run.summary.get('test_accuracy')
    ax.scatter(run.summary.get('sparsity'), acc, color=f'C{i}', s=40, label=run.label)
  ax.set_xlabel('sparsity of the ternary weights')
  ax.set_ylabel('test accuracy')
  ax.set_title('accuracy vs sparsity')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, path_sparsity)
  fig = Figure(figsize=(6, 4.2), layout='constrained')
  ax = fig.subplots()
  for i, run in enumerate(runs):
    acc = run.summary.get('test_accuracy')
    ax.scatter(run.sizes['packed'] / 1024, acc, color=f'C{i}', marker='o', s=40, label=run.label)
    ax.scatter(run.sizes['entropy_coded'] / 1024, acc, color=f'C{i}', marker='x', s=50)
    ax.scatter(run.sizes['float32'] / 1024, acc, color=f'C{i}', marker='s', s=30, alpha=0.4)
  ax.set_xscale('log')
  ax.set_xlabel('size (KiB): ■ float32, ● packed, × entropy coded')
  ax.set_ylabel('test accuracy')
  ax.set_title('accuracy vs compressed size')
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=8)
  _save(fig, path_size)


def plot_sweep(runs: Sequence[RunData], path_sparsity: str, path_size: str) -> None:
  """Test accuracy against sparsity and against the entropy-coded size: a trade-off curve.

  One point per run, labelled by `run.label`, joined from left to right. The
  full-precision test accuracy the runs share (if they share one) is a dashed line, and
  on the size plot also a square at the float32 size.
  """
  points = [r for r in runs if isinstance(r.summary.get('test_accuracy'), (int, float))]
  points.sort(key=lambda r: (r.summary.get('sparsity') or 0.0, r.sizes['entropy_coded']))
  acc = [r.summary['test_accuracy'] for r in points]
  fp = _shared_fp_accuracy(runs)
  for path, xs, xlabel, title in (
    (
      path_sparsity,
      [r.summary.get('sparsity') or 0.0 for r in points],
      'sparsity of the ternary weights',
      'test accuracy vs sparsity',
    ),
    (
      path_size,
      [r.sizes['entropy_coded'] / 1024 for r in points],
      'entropy-coded size (KiB)',
      'test accuracy vs compressed size',
    ),
  ):
    fig = Figure(figsize=(6.4, 4.4), layout='constrained')
    ax = fig.subplots()
    order = np.argsort(xs, kind='stable')
    ax.plot(np.asarray(xs)[order], np.asarray(acc)[order], '-', color='#95a5a6', linewidth=1)
    ax.scatter(xs, acc, color='#2471a3', s=36, zorder=2)
    for x, y, r in zip(xs, acc, points, strict=True):
      ax.annotate(r.label, (x, y), textcoords='offset points', xytext=(4, 4), fontsize=7)
    if fp is not None:
      ax.axhline(fp, color='#27ae60', linestyle='--', linewidth=1, label=f'full precision {fp:.4f}')
    if path == path_size and points:
      if fp is not None:
        float32 = points[0].sizes['float32'] / 1024
        ax.scatter([float32], [fp], marker='s', color='#27ae60', s=36, label='float32 network')
      ax.set_xscale('log')
    ax.set_xlabel(xlabel)
    ax.set_ylabel('test accuracy')
    ax.set_title(title)
    ax.grid(alpha=0.3, which='both')
    ax.margins(x=0.12, y=0.08)  # Room for the labels at the ends.
    if fp is not None:
      ax.legend(fontsize=8, loc='best')
    _save(fig, path)
