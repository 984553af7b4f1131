"""The run summary: what `summary.json` holds, and the table the program prints at the end."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

import ec2t_jax
from ec2t_jax import tree_util
from ec2t_jax.training import setup as setup_lib
from ec2t_jax.training import workdir as workdir_lib

__all__ = ['print_summary', 'saved_summary', 'summarize_run']


def saved_summary(workdir: str, params: Any) -> dict[str, Any] | None:
  """`summary.json` if it belongs to `params` (the same params_sha256), else None."""
  path = os.path.join(workdir, 'summary.json')
  if not os.path.exists(path):
    return None
  try:
    saved = workdir_lib.read_json_object(path, 'the run summary')
  except ValueError as e:
    logging.warning('%s; computing the summary again', e)
    return None
  if saved.get('params_sha256') != setup_lib.params_sha256(params):
    logging.warning(
      '%s does not belong to the newest checkpoint (another params_sha256); computing the '
      'summary again',
      path,
    )
    return None
  return saved


def summarize_run(run, setup, state, meta, *, val, test, steps) -> dict[str, Any]:
  """The run's summary: accuracies, sparsity, parameter counts, the params' hash, the schedule."""
  params = jax.device_get(state.params)
  per_layer, sparsity = tree_util.zero_fractions(params, setup.ternary_mask)
  _, total_sparsity = tree_util.zero_fractions(params)
  sizes = [np.size(x) for x in jax.tree.leaves(params)]
  selected = [bool(m) for m in jax.tree.leaves(setup.ternary_mask)]
  compressing = [p for p in setup.passes if p.compresses]
  method = run.method
  # γ and s of the last compression pass (config.ec2t's for the default stages), for a
  # method that reads them (EC2T; the baselines have neither).
  ec2t_settings = 'gamma' in ec2t_jax.methods.get(method).settings
  last = compressing[-1].settings if compressing else run.ec2t
  return {
    'model': run.model.name,
    'dataset': run.data.name,
    'method': method,
    'fp_test_accuracy': meta.get('fp_test_accuracy'),
    'fp_val_accuracy': meta.get('fp_val_accuracy'),
    'test_accuracy': test.get('accuracy'),
    'test_loss': test.get('loss'),
    'val_accuracy': val.get('accuracy'),
    'best_val_accuracy': meta.get('best_val_accuracy'),
    'best_step': meta.get('best_step'),
    'sparsity': sparsity,
    'total_sparsity': total_sparsity,
    'num_params': int(sum(sizes)),
    'num_ternary_params': int(sum(n for n, m in zip(sizes, selected, strict=True) if m)),
    'steps': steps,
    'params_sha256': setup_lib.params_sha256(params),
    'per_layer_sparsity': per_layer,
    'gamma': float(last.gamma) if ec2t_settings else None,
    'init_scale': float(last.init_scale) if ec2t_settings else None,
    'passes': [
      {'name': p.name, 'kind': p.kind}
      | (
        {'gamma': p.settings.gamma, 'init_scale': p.settings.init_scale}
        if p.compresses and ec2t_settings
        else {}
      )
      for p in setup.passes
    ],
    'schedule': setup.schedule.to_dict(),
  }


def print_summary(summary: dict[str, Any]) -> None:
  """Prints the summary's main numbers as a small table."""
  rows = [
    ('method', summary.get('method', 'ec2t')),
    ('full-precision test accuracy', summary.get('fp_test_accuracy')),
    ('ternary test accuracy (final)', summary.get('test_accuracy')),
    ('magnitude-pruned test accuracy', summary.get('magnitude_pruned_test_accuracy')),
    ('ternary val accuracy (final)', summary.get('val_accuracy')),
    ('best val accuracy', summary.get('best_val_accuracy')),
    ('sparsity of ternary weights', summary.get('sparsity')),
    ('sparsity of all params', summary.get('total_sparsity')),
    ('params', summary.get('num_params')),
    ('steps', summary.get('steps')),
    ('wall time (s)', summary.get('wall_time_s')),
    ('params sha256', summary.get('params_sha256')),
  ]
  width = max(len(r[0]) for r in rows)
  lines = ['', 'EC2T run summary', '-' * (width + 20)]
  for name, value in rows:
    if value is None and name.startswith('magnitude'):  # Only runs that set it.
      continue
    if isinstance(value, float):
      value = f'{value:.4f}'
    lines.append(f'{name:<{width}}  {value}')
  print('\n'.join(lines), flush=True)
