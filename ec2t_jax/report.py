"""A Markdown report with figures of one or more EC2T runs.

For each workdir written by `ec2t_jax.training.train.train_and_evaluate` this reads
``summary.json``, ``metrics.jsonl`` and the newest (or best) checkpoint, and
draws (matplotlib, headless: no pyplot, no display):

* training curves: loss, train/validation accuracy, sparsity and entropy of
  the ternary weights, and the centroids of every layer against the step,
  with the start of every stage after the first marked (EC2T, frozen
  assignment, or the named stages of `config.stages`);
* per-layer sparsity and centroid values ``w_p``, ``-w_n`` (bar charts);
* histograms of the latent weights of a few layers, split by their
  assignment, with the decision thresholds of the entropy-constrained
  assignment marked. Assigning ``w`` to a level ``c`` costs
  ``(w - c)^2 + λ·I_c`` (EC2T, Marban et al., CVPR-W 2020, arXiv 2004.01077,
  Eq. 5, and docs/algorithm.md §4; ``I_c = -log2 P_c``), so ``w`` goes to
  ``+w_p`` rather than 0 above

      t_p = w_p/2 + λ·(I_p - I_0) / (2·w_p)

  and to ``-w_n`` below ``t_n = -(w_n/2 + λ·(I_n - I_0) / (2·w_n))``; plain
  nearest neighbour (``λ = 0``) gives ``±w/2``, also drawn;

and, for several workdirs, test accuracy against sparsity and against the
exported size (`ec2t_jax.export`, packed and entropy coded). ``report.md``
embeds the figures and tables of the summaries, the MicroNet-rules cost
(`ec2t_jax.scoring`, both modes) and the storage sizes. A run of the absmean
baseline (``config.method='absmean'``, docs/baselines.md) shows its one level
per layer as ``w_p = w_n = mean|W|`` and ``λ = 0``.

For the runs of a (γ, s) sweep (`ec2t_jax.sweep`), `write_sweep_report` writes
``sweep.md``: one table row per run, sorted by entropy-coded size, and test accuracy
against sparsity and against the entropy-coded size as trade-off curves.

Command line::

    python -m ec2t_jax.report --workdir /tmp/wd_mnist --out docs/report_example
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ec2t_jax.training import schedule as schedule_lib

__all__ = [
  'LayerState',
  'RunData',
  'decision_thresholds',
  'load_run',
  'main',
  'phase_boundaries',
  'plot_comparison',
  'plot_curves',
  'plot_histograms',
  'plot_layers',
  'plot_sweep',
  'write_report',
  'write_sweep_report',
]

_DPI = 90
_COLORS = {'neg': '#c0392b', 'zero': '#7f8c8d', 'pos': '#2471a3'}


@dataclasses.dataclass
class LayerState:
  """One ternary layer of the final EC2T state.

  Attributes:
    name: kernel path (``'fc1/kernel'``).
    size: weights.
    sparsity: fraction of zeros.
    w_p: positive centroid.
    w_n: magnitude of the negative centroid.
    lam: the λ of the last assignment.
    pmf: cluster probabilities ``(P_n, P_0, P_p)`` of the last assignment.
    entropy_bits: empirical entropy of the assignment (bits per weight).
    latent: the latent full-precision weights (flattened).
    assignment: the assignment (0 → ``-w_n``, 1 → 0, 2 → ``+w_p``; flattened).
  """

  name: str
  size: int
  sparsity: float
  w_p: float
  w_n: float
  lam: float
  pmf: np.ndarray
  entropy_bits: float
  latent: np.ndarray | None = None
  assignment: np.ndarray | None = None


@dataclasses.dataclass
class RunData:
  """Everything the report shows of one workdir."""

  workdir: str
  label: str
  summary: dict[str, Any]
  metrics: list[dict[str, float]]
  phases: dict[str, int]
  layers: list[LayerState]
  cost: dict[str, dict[str, float]]
  sizes: dict[str, float]


def decision_thresholds(
  centroids: Sequence[float], pmf: Sequence[float], lam: float
) -> tuple[float, float]:
  """``(t_n, t_p)``: the assignment picks ``-w_n`` below ``t_n`` and ``+w_p`` above ``t_p``.

  Derived from the cost ``(w - c)^2 + λ·I_c`` of `ec2t_jax.ternary.assign`
  (see the module docstring). With ``λ = 0`` these are ``(-w_n/2, w_p/2)``.

  Args:
    centroids: ``[w_p, w_n]`` (magnitudes).
    pmf: the cluster probabilities ``(P_n, P_0, P_p)`` the assignment used.
    lam: the λ it used.

  Returns:
    The two thresholds.

  Example:
    >>> decision_thresholds([0.4, 0.2], [0.25, 0.5, 0.25], 0.0)
    (-0.1, 0.2)
  """
  w_p, w_n = (float(c) for c in centroids)
  info = [-math.log2(max(float(p), np.finfo(np.float32).tiny)) for p in pmf]
  t_p = w_p / 2 + (lam * (info[2] - info[1]) / (2 * w_p) if w_p > 0 else math.inf)
  t_n = -(w_n / 2 + (lam * (info[0] - info[1]) / (2 * w_n) if w_n > 0 else math.inf))
  return t_n, t_p


def phase_boundaries(schedule: schedule_lib.Schedule) -> dict[str, int]:
  """The step at which each stage starts, by stage label, for the marks on the training curves.

  Every stage with steps after the first one gets a mark, labelled by its name, or by
  its kind where it has none (`'ec2t'`, `'frozen'`, ...; a repeated label gets `_2`,
  `_3`, ...). Read from the run's schedule (`Workdir.schedule`), the one value the
  trainer computed its stages from.

  Example:
    >>> from ec2t_jax.training import schedule as schedule_lib
    >>> config = {'fp': {'num_epochs': 1}, 'ec2t': {'num_epochs': 2, 'frozen_epochs': 1}}
    >>> phase_boundaries(schedule_lib.create_schedule(config, steps_per_epoch=3))
    {'ec2t': 3, 'frozen': 9}
  """
  running = [stage for stage in schedule.stages if stage.num_steps > 0]
  marks: dict[str, int] = {}
  for stage in running[1:]:
    base = getattr(stage, 'name', '') or stage.kind
    label, i = base, 2
    while label in marks:
      label, i = f'{base}_{i}', i + 1
    marks[label] = stage.start
  return marks


def _label(workdir: str, taken: set[str]) -> str:
  base = os.path.basename(os.path.normpath(workdir)) or 'run'
  label, i = base, 2
  while label in taken:
    label, i = f'{base}_{i}', i + 1
  taken.add(label)
  return label


def _symbol_entropy(assignment: np.ndarray) -> tuple[np.ndarray, float]:
  """The symbols' empirical probabilities and their entropy in bits (float64, as exported)."""
  from ec2t_jax import ternary

  p = np.bincount(assignment.astype(np.int64), minlength=3) / max(assignment.size, 1)
  with jax.enable_x64(True):
    return p, float(ternary.entropy_bits(p))


def _layer_states(run: Any) -> list[LayerState]:
  from ec2t_jax import baselines, masks, state_utils, transforms, tree_util

  x = jax.ShapeDtypeStruct((1, *run.image_shape), jnp.float32)
  order = masks.call_order(run.model, x, train=False)
  rank = {path: i for i, path in enumerate(order)}
  sparsity, _ = tree_util.zero_fractions(run.variables['params'], run.ternary_mask)
  out = []
  for state in state_utils.compression_states(run.opt_state):
    if not isinstance(state, transforms.TernaryTrainingState):
      continue
    latent = dict(tree_util.named_leaves(state.latent))
    cent = dict(tree_util.named_leaves(state.centroids))
    pmf = dict(tree_util.named_leaves(state.pmf))
    lam = dict(tree_util.named_leaves(state.lam))
    for name, a in tree_util.named_leaves(state.assignment):
      a = np.asarray(a).ravel()
      _, entropy = _symbol_entropy(a)
      out.append(
        LayerState(
          name=name,
          size=int(a.size),
          sparsity=sparsity[name],
          w_p=float(np.asarray(cent[name])[0]),
          w_n=float(np.asarray(cent[name])[1]),
          lam=float(np.asarray(lam[name])),
          pmf=np.asarray(pmf[name], np.float64),
          entropy_bits=entropy,
          latent=np.asarray(latent[name], np.float32).ravel(),
          assignment=a,
        )
      )
  # The absmean baseline: levels ±m, no λ; m on the grid of the params leaf's dtype.
  dtypes = tree_util.leaf_dtypes(run.variables['params'])
  for state in baselines.states(run.opt_state):
    for name, w in tree_util.named_leaves(state.latent, skip_masked=True):
      dtype = dtypes.get(name, jnp.float32)
      a = np.asarray(baselines.absmean_assignment(w, state.quantizer_eps, dtype)).ravel()
      p, entropy = _symbol_entropy(a)
      m = float(baselines.absmean_scale(w, dtype))
      out.append(
        LayerState(
          name=name,
          size=int(a.size),
          sparsity=sparsity[name],
          w_p=m,
          w_n=m,
          lam=0.0,
          pmf=p,
          entropy_bits=entropy,
          latent=np.asarray(w, np.float32).ravel(),
          assignment=a,
        )
      )
  return sorted(out, key=lambda s: (rank.get(s.name.rsplit('/', 1)[0], len(rank)), s.name))


def load_run(
  workdir: str,
  label: str,
  *,
  best: bool = False,
  progress: Callable[[str], None] | None = None,
  compilation_cache: bool = False,
) -> RunData:
  """Reads one workdir: summary, metrics, final EC2T state, cost and export sizes.

  Args:
    workdir: a finished run's directory.
    label: its name in the report.
    best: use the best-by-validation checkpoint instead of the newest.
    progress: called with a line before each step that takes time (None: silent).
    compilation_cache: use the run's persistent compilation cache
      (`ec2t_jax.training.workdir.load_workdir`).
  """
  from ec2t_jax import export, scoring
  from ec2t_jax.training import metric_writers
  from ec2t_jax.training import workdir as workdir_lib

  path = os.path.join(workdir, 'summary.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir!r} has no summary.json: has its run finished?')
  with open(path) as f:
    summary = json.load(f)
  run = workdir_lib.load_workdir(
    workdir, best=best, progress=progress, compilation_cache=compilation_cache
  )
  if progress is not None:
    progress(f'counting the cost and the export sizes of checkpoint {run.step}')
  cost = {mode: dict(scoring.count_run(run, mode=mode).totals) for mode in scoring.MODES}
  # The files `python -m ec2t_jax.export --fp16 [--entropy-coding]` writes, byte for byte
  # (its model description included), so that both report the same sizes.
  options = dict(fp_dtype='float16', model=export.run_model_info(run))
  _, packed = export.dumps(run.variables, run.opt_state, **options)
  _, coded = export.dumps(run.variables, run.opt_state, entropy_coding=True, **options)
  sizes = {
    'float32': packed.float32_bytes,
    'packed': packed.total_bytes,
    'entropy_coded': coded.total_bytes,
    'packed_bits': packed.ternary_payload_bits,
    'coded_bits': coded.ternary_payload_bits,
    'bound_bits': coded.entropy_bound_bits,
  }
  metrics = metric_writers.read_metrics(workdir)
  phases = phase_boundaries(run.schedule)
  return RunData(workdir, label, summary, metrics, phases, _layer_states(run), cost, sizes)


# --- figures ---------------------------------------------------------------------------------


def _save(fig: Figure, path: str) -> None:
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=_DPI, pil_kwargs={'optimize': True})


def _series(metrics: Sequence[Mapping[str, float]], key: str) -> tuple[np.ndarray, np.ndarray]:
  last: dict[int, float] = {}
  for row in metrics:  # A resumed run may log a step twice: the last one wins.
    if key in row and math.isfinite(row[key]):
      last[int(row['step'])] = float(row[key])
  steps = np.asarray(sorted(last), np.float64)
  return steps, np.asarray([last[int(s)] for s in steps], np.float64)


# How the legend names the start of a stage labelled by its kind (other labels: '<name> starts').
_STAGE_STARTS = {
  'fp': 'full precision starts',
  'ec2t': 'EC2T starts',
  'frozen': 'assignment frozen',
  'ecp': 'ECP starts',
}
_MARK_STYLES = ('--', ':', '-.', (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))


def _mark_phases(ax: Any, phases: Mapping[str, int], *, legend: bool = False) -> None:
  for i, (label, step) in enumerate(phases.items()):
    text = _STAGE_STARTS.get(label, f'{label} starts')
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


# --- the report ------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = '.4f') -> str:
  if value is None:
    return '–'
  if isinstance(value, float) and not math.isfinite(value):
    return '–'
  return format(value, spec)


def _markdown(runs: Sequence[RunData], images: Mapping[str, list[tuple[str, str]]]) -> str:
  lines = [
    '# EC2T report',
    '',
    'Entropy-Constrained Trained Ternarization (Marban, Becking, Wiedemann & Samek, '
    'CVPR Workshops 2020, arXiv 2004.01077). Generated by `python -m ec2t_jax.report` from '
    + ', '.join(f'`{r.workdir}`' for r in runs)
    + '.',
    '',
    '## Summary',
    '',
    '| run | model | dataset | method | FP test acc | ternary test acc | best val acc '
    '| sparsity | entropy (bits/w) | params | steps | wall time |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in runs:
    s = r.summary
    wall = s.get('wall_time_s')
    lines.append(
      f'| {r.label} | {s.get("model")} | {s.get("dataset")} | {s.get("method", "ec2t")} '
      f'| {_fmt(s.get("fp_test_accuracy"))} '
      f'| {_fmt(s.get("test_accuracy"))} | {_fmt(s.get("best_val_accuracy"))} '
      f'| {_fmt(s.get("sparsity"), ".1%")} | {_fmt(s.get("ec2t/entropy_bits"), ".3f")} '
      f'| {_fmt(s.get("num_params"), ",d")} | {_fmt(s.get("steps"), ",d")} '
      f'| {_fmt(wall / 60 if wall else None, ".1f")} min |'
    )
  lines += [
    '',
    '## Cost under the MicroNet rules',
    '',
    '32-bit equivalents (`ec2t_jax.scoring`, 16-bit storage and multiplications, 32-bit '
    'additions, tree adder). `corrected` counts every operation; `reference` reproduces the '
    'published counter with its quirks (docs/scoring.md).',
    '',
    '| run | mode | params | mults | adds | FLOPs | score |',
    '|---|---|---|---|---|---|---|',
  ]
  for r in runs:
    for mode, t in r.cost.items():
      score = 'n/a' if math.isnan(t['score']) else f'{t["score"]:.3g}'  # No reference network.
      lines.append(
        f'| {r.label} | {mode} | {t["params"]:,.0f} | {t["mults"]:,.0f} | {t["adds"]:,.0f} '
        f'| {t["flops"]:,.0f} | {score} |'
      )
  lines += [
    '',
    '## Storage',
    '',
    'The files `python -m ec2t_jax.export --fp16` (packed) and `python -m ec2t_jax.export '
    '--fp16 --entropy-coding` (entropy coded) write, byte for byte: full-precision leaves in '
    'float16, float32 centroids (bit-exact ternary layers), the model description included; '
    'without `--fp16` the export keeps full-precision leaves in float32 and its files are '
    'larger. KiB = 1024 bytes. The ternary payload is one mask bit per weight and one '
    'sign bit per non-zero when packed, and a range-coded stream when entropy coded; '
    '`Σ N·H(P)` is its entropy bound.',
    '',
    '| run | float32 | packed (--fp16) | ratio | entropy coded (--fp16) | ratio '
    '| ternary payload packed '
    '| coded | Σ N·H(P) | coded overhead |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in runs:
    z = r.sizes
    lines.append(
      f'| {r.label} | {z["float32"] / 1024:,.1f} KiB | {z["packed"] / 1024:,.1f} KiB '
      f'| {z["float32"] / z["packed"]:.1f}x | {z["entropy_coded"] / 1024:,.1f} KiB '
      f'| {z["float32"] / z["entropy_coded"]:.1f}x | {z["packed_bits"]:,.0f} bits '
      f'| {z["coded_bits"]:,.0f} bits | {z["bound_bits"]:,.0f} bits '
      f'| {100 * (z["coded_bits"] / max(z["bound_bits"], 1) - 1):+.2f}% |'
    )
  for r in runs:
    lines += ['', f'## {r.label}', '']
    for title, image in images[r.label]:
      lines += [f'### {title}', '', f'![{title}]({urllib.parse.quote(image)})', '']
    lines += [
      'Ternary layers of the final state (`t_n`, `t_p`: decision thresholds of the last '
      'assignment; `±w/2` would be plain nearest neighbour):',
      '',
      '| layer | weights | sparsity | w_p | w_n | λ | t_n | t_p | entropy (bits/w) |',
      '|---|---|---|---|---|---|---|---|---|',
    ]
    for layer in r.layers:
      t_n, t_p = decision_thresholds([layer.w_p, layer.w_n], layer.pmf, layer.lam)
      lines.append(
        f'| {layer.name} | {layer.size:,d} | {layer.sparsity:.1%} | {layer.w_p:.4f} '
        f'| {layer.w_n:.4f} | {layer.lam:.3g} | {t_n:+.4f} | {t_p:+.4f} '
        f'| {layer.entropy_bits:.3f} |'
      )
  if 'comparison' in images:
    lines += ['', '## Comparison', '']
    for title, image in images['comparison']:
      lines += [f'### {title}', '', f'![{title}]({urllib.parse.quote(image)})', '']
  return '\n'.join(lines) + '\n'


def write_report(
  workdirs: Sequence[str],
  out: str,
  *,
  best: bool = False,
  progress: Callable[[str], None] | None = None,
  compilation_cache: bool = False,
) -> str:
  """Writes ``out/report.md`` and its PNG figures for one or more workdirs.

  Args:
    workdirs: directories written by `ec2t_jax.training.train.train_and_evaluate` (finished runs).
    out: the output directory (created).
    best: use the best-by-validation checkpoints instead of the newest.
    progress: called with a line before each step that takes time (None: silent;
      the command line passes `ec2t_jax.training.workdir.progress_printer`).
    compilation_cache: use each run's persistent compilation cache (`load_run`).

  Returns:
    The path of ``report.md``.

  Raises:
    ValueError: if no workdir is given.
    FileNotFoundError: if a workdir has no ``summary.json`` or no checkpoint.

  Example:
    >>> write_report(['/tmp/wd_mnist'], '/tmp/report')  # doctest: +SKIP
    '/tmp/report/report.md'
  """
  if not workdirs:
    raise ValueError('give at least one workdir')
  os.makedirs(out, exist_ok=True)
  taken: set[str] = set()
  runs = [
    load_run(w, _label(w, taken), best=best, progress=progress, compilation_cache=compilation_cache)
    for w in workdirs
  ]
  images: dict[str, list[tuple[str, str]]] = {}
  for r in runs:
    if progress is not None:
      progress(f'drawing the figures of {r.label} into {out}')
    files = []
    for title, suffix, plot in (
      ('Training curves', 'curves', plot_curves),
      ('Per-layer sparsity and centroids', 'layers', plot_layers),
      ('Latent weights and decision thresholds', 'histograms', plot_histograms),
    ):
      if suffix != 'curves' and not r.layers:
        continue
      name = f'{r.label}_{suffix}.png'
      plot(r, os.path.join(out, name))
      files.append((title, name))
    images[r.label] = files
  if len(runs) > 1:
    plot_comparison(
      runs,
      os.path.join(out, 'accuracy_vs_sparsity.png'),
      os.path.join(out, 'accuracy_vs_size.png'),
    )
    images['comparison'] = [
      ('Accuracy vs sparsity', 'accuracy_vs_sparsity.png'),
      ('Accuracy vs compressed size', 'accuracy_vs_size.png'),
    ]
  path = os.path.join(out, 'report.md')
  with open(path, 'w') as f:
    f.write(_markdown(runs, images))
  return path


# --- a sweep over γ and s -----------------------------------------------------------------------


def _sweep_label(gamma: float, init_scale: float) -> str:
  return f'γ={gamma:g}, s={init_scale:g}'


def _shared_fp_accuracy(runs: Sequence[RunData]) -> float | None:
  """The full-precision test accuracy all runs started from, or None if they differ."""
  values = {r.summary.get('fp_test_accuracy') for r in runs}
  value = values.pop() if len(values) == 1 else None
  return value if isinstance(value, (int, float)) and math.isfinite(value) else None


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


def _sweep_markdown(rows: Sequence[tuple[float, float, RunData]], out: str, images) -> str:
  runs = [r for _, _, r in rows]
  first = runs[0].summary
  lines = [
    '# EC2T sweep over γ and s',
    '',
    f'{len(rows)} runs of `{first.get("model")}` on `{first.get("dataset")}`, one per '
    'entropy gain γ and initial centroid scale s, sorted by entropy-coded size (written by '
    '`ec2t_jax.report.write_sweep_report`). Sizes are those of the files '
    '`python -m ec2t_jax.export --fp16 --entropy-coding` writes (full-precision leaves in '
    'float16); float32 is the uncompressed network.',
    '',
  ]
  fp = _shared_fp_accuracy(runs)
  if fp is not None:
    lines += [f'Every run starts from one full-precision network: test accuracy {fp:.4f}.', '']
  lines += [
    '| γ | s | test acc | best val acc | sparsity | entropy coded | ratio | float32 | run |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for gamma, init_scale, r in rows:
    s, z = r.summary, r.sizes
    where = os.path.relpath(r.workdir, out)
    lines.append(
      f'| {gamma:g} | {init_scale:g} | {_fmt(s.get("test_accuracy"))} '
      f'| {_fmt(s.get("best_val_accuracy"))} | {_fmt(s.get("sparsity"), ".2%")} '
      f'| {z["entropy_coded"] / 1024:,.2f} KiB | {z["float32"] / z["entropy_coded"]:.1f}x '
      f'| {z["float32"] / 1024:,.1f} KiB | `{where}` |'
    )
  for title, image in images:
    lines += ['', f'## {title}', '', f'![{title}]({urllib.parse.quote(image)})']
  return '\n'.join(lines) + '\n'


def write_sweep_report(
  points: Sequence[tuple[float, float, str]], out: str, *, best: bool = False
) -> str:
  """Writes ``out/sweep.md`` and two trade-off plots for the runs of a (γ, s) sweep.

  The table lists γ, s, test accuracy, best validation accuracy, sparsity of the ternary
  weights, entropy-coded and float32 size (`load_run(...).sizes`), sorted by size; the
  plots (`plot_sweep`) are ``sweep_accuracy_vs_sparsity.png`` and
  ``sweep_accuracy_vs_size.png``. `ec2t_jax.sweep` writes it for its points.

  Args:
    points: ``(gamma, init_scale, workdir)`` of each finished run.
    out: the output directory (created).
    best: use the best-by-validation checkpoints instead of the newest.

  Returns:
    The path of ``sweep.md``.

  Raises:
    ValueError: if no point is given.
    FileNotFoundError: if a workdir has no ``summary.json`` or no checkpoint.

  Example:
    >>> points = [(0.0, 0.3, 'sw/g0_s0.3'), (0.3, 0.3, 'sw/g0.3_s0.3')]
    >>> write_sweep_report(points, 'sw')  # doctest: +SKIP
    'sw/sweep.md'
  """
  if not points:
    raise ValueError('give at least one (gamma, init_scale, workdir) point; got none')
  os.makedirs(out, exist_ok=True)
  rows = [
    (float(g), float(s), load_run(w, _sweep_label(float(g), float(s)), best=best))
    for g, s, w in points
  ]
  rows.sort(key=lambda row: (row[2].sizes['entropy_coded'], row[0], row[1]))
  images = [
    ('Test accuracy vs sparsity', 'sweep_accuracy_vs_sparsity.png'),
    ('Test accuracy vs entropy-coded size', 'sweep_accuracy_vs_size.png'),
  ]
  plot_sweep([r for _, _, r in rows], *(os.path.join(out, name) for _, name in images))
  path = os.path.join(out, 'sweep.md')
  with open(path, 'w') as f:
    f.write(_sweep_markdown(rows, out, images))
  return path


def main(argv: Sequence[str] | None = None) -> int:
  """Command line entry point (``python -m ec2t_jax.report --help``)."""
  parser = argparse.ArgumentParser(
    prog='python -m ec2t_jax.report', description=__doc__.split('\n\n')[0]
  )
  parser.add_argument('--workdir', action='append', required=True, help='repeat for several runs')
  parser.add_argument('--out', required=True, help='output directory for report.md and PNGs')
  parser.add_argument('--best', action='store_true', help='best-by-validation checkpoints')
  args = parser.parse_args(argv)
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    print(f'error: --out {args.out!r} is a file, not a directory', file=sys.stderr)
    return 2
  logging.getLogger('absl').setLevel(logging.WARNING)
  from ec2t_jax.training import workdir as workdir_lib

  try:
    path = write_report(
      args.workdir,
      args.out,
      best=args.best,
      progress=workdir_lib.progress_printer('report'),
      compilation_cache=True,
    )
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
