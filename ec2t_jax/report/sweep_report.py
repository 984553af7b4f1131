"""``sweep.md``: the trade-off table and plots of the runs of a (γ, s) sweep.

`write_sweep_report` writes it; `ec2t_jax.sweep` calls it for its points.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Sequence

from ec2t_jax import files
from ec2t_jax.report.figures import plot_sweep
from ec2t_jax.report.markdown import _fmt
from ec2t_jax.report.runs import RunData, _shared_fp_accuracy, load_run


def _sweep_label(gamma: float, init_scale: float) -> str:
  return f'γ={gamma:g}, s={init_scale:g}'


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
  files.replace_file(path, _sweep_markdown(rows, out, images))
  return path
