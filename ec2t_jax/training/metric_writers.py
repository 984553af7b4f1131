"""Metric writers: console lines, TensorBoard event files and a JSON-lines log.

`clu.metric_writers` imports TensorFlow when the package is imported, and
TensorFlow is not a dependency of `ec2t_jax` (it is needed only to prepare stock
tfds datasets once). These writers offer the same `write_scalars` /
`write_hparams` / `flush` / `close` interface: TensorBoard files come from
`tensorboardX`, and `metrics.jsonl` is what `ec2t_jax.report` plots.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

Scalars = Mapping[str, Any]


def _to_float(value: Any) -> float:
  return float(np.asarray(value))


class MetricWriter:
  """Writes scalars to the console, TensorBoard and `<workdir>/metrics.jsonl`.

  Only process 0 writes files; other processes log to the console only.

  Args:
    workdir: directory for `metrics.jsonl` and the TensorBoard event files.
    write_files: False makes this a console-only writer.
    console_keys: keys to print (a prefix match); None prints all.
  """

  def __init__(
    self, workdir: str, *, write_files: bool = True, console_keys: tuple[str, ...] | None = None
  ):
    self._console_keys = console_keys
    self._jsonl = None
    self._tb = None
    if write_files:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')  # noqa: SIM115
      try:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(logdir=os.path.join(workdir, 'tensorboard'))
      except ImportError:  # pragma: no cover - tensorboardX is a dependency.
        logging.warning('tensorboardX is not installed: no TensorBoard event files.')

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    """Writes a dict of scalars for `step` to every sink."""
    values = {k: _to_float(v) for k, v in scalars.items()}
    shown = {
      k: v
      for k, v in values.items()
      if self._console_keys is None or any(k.startswith(p) for p in self._console_keys)
    }
    if shown:
      logging.info('[%d] %s', step, ', '.join(f'{k}={v:.6g}' for k, v in sorted(shown.items())))
    if self._jsonl is not None:
      self._jsonl.write(json.dumps({'step': int(step), **values}) + '\n')
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, int(step))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Records the hyperparameters (flattened config) once."""
    flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
    logging.info('hparams: %s', json.dumps(flat, sort_keys=True))
    if self._tb is not None:
      self._tb.add_text('hparams', json.dumps(flat, sort_keys=True, indent=1), 0)

  def flush(self) -> None:
    """Flushes every sink."""
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes every sink."""
    self.flush()
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """Reads `<workdir>/metrics.jsonl` (a resumed run may log a step twice: last wins)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          continue  # A line cut by a kill; the rest of the log is fine.
  return rows
