"""Reading a finished run for the report: its summary, metrics, layer states, cost and sizes.

`load_run` reads one workdir into a `RunData`, with one `LayerState` per ternary layer;
`decision_thresholds` and `phase_boundaries` are what the figures and tables mark
(the derivation of the thresholds is in the `ec2t_jax.report` docstring).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ec2t_jax.training import schedule as schedule_lib


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
  (see the `ec2t_jax.report` docstring). With ``λ = 0`` these are ``(-w_n/2, w_p/2)``.

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
    >>> from ec2t_jax.configs import mnist
    >>> from ec2t_jax.training import parse
    >>> stages = parse.stage_specs(mnist.get_config())  # 10 fp, 8 EC2T, 4 frozen epochs
    >>> phase_boundaries(schedule_lib.create_schedule(stages, steps_per_epoch=3))
    {'ec2t': 30, 'frozen': 54}
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
  """One `LayerState` per ternary leaf of the run, read through its method's `layers` view.

  Leaves outside `run.ternary_mask` (those an ecp stage prunes) are not ternary and
  are left out.
  """
  from ec2t_jax import masks, methods, tree_util

  x = jax.ShapeDtypeStruct((1, *run.image_shape), jnp.float32)
  order = masks.call_order(run.model, x, train=False)
  rank = {path: i for i, path in enumerate(order)}
  sparsity, _ = tree_util.zero_fractions(run.variables['params'], run.ternary_mask)
  dtypes = tree_util.leaf_dtypes(run.variables['params'])
  out = []
  for method, state in methods.method_states(run.opt_state):
    for name, layer in method.layers(state, lambda n: dtypes.get(n, jnp.float32)).items():
      if name not in sparsity:
        continue
      a = np.asarray(layer.assignment).ravel()
      p, entropy = _symbol_entropy(a)
      out.append(
        LayerState(
          name=name,
          size=int(a.size),
          sparsity=sparsity[name],
          w_p=float(np.asarray(layer.w_p)),
          w_n=float(np.asarray(layer.w_n)),
          lam=0.0 if layer.lam is None else float(np.asarray(layer.lam)),
          pmf=p if layer.pmf is None else np.asarray(layer.pmf, np.float64),
          entropy_bits=entropy,
          latent=np.asarray(layer.latent, np.float32).ravel(),
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


def _shared_fp_accuracy(runs: Sequence[RunData]) -> float | None:
  """The full-precision test accuracy all runs started from, or None if they differ."""
  values = {r.summary.get('fp_test_accuracy') for r in runs}
  value = values.pop() if len(values) == 1 else None
  return value if isinstance(value, (int, float)) and math.isfinite(value) else None
