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

from ec2t_jax.report.cli import main
from ec2t_jax.report.figures import (
  plot_comparison,
  plot_curves,
  plot_histograms,
  plot_layers,
  plot_sweep,
)
from ec2t_jax.report.markdown import write_report
from ec2t_jax.report.runs import (
  LayerState,
  RunData,
  decision_thresholds,
  load_run,
  phase_boundaries,
)
from ec2t_jax.report.sweep_report import write_sweep_report

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
