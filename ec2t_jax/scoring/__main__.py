"""Prints the MicroNet-rules cost of a trained run (``ec2t_jax.scoring.count``).

EC2T (Marban et al., CVPR-W 2020, arXiv 2004.01077) reports scoring
parameters, multiplications, additions and the MicroNet score; this command
computes them for the newest (or best) checkpoint of a workdir::

    python -m ec2t_jax.scoring --workdir /tmp/wd_mnist
    python -m ec2t_jax.scoring --workdir /tmp/wd_mnist --mode reference --best --json cost.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence

from ec2t_jax import scoring

__all__ = ['main', 'score_workdir']


def score_workdir(
  workdir: str, *, mode: str = 'corrected', best: bool = False, **kwargs
) -> scoring.Report:
  """`scoring.count` of a workdir's newest (or best-by-validation) checkpoint.

  Args:
    workdir: a directory written by `ec2t_jax.training.train.train_and_evaluate`.
    mode: ``'corrected'`` or ``'reference'``.
    best: score the best-by-validation checkpoint.
    **kwargs: further `scoring.count` options (``mul_bits``, ``half_precision``, ...).

  Returns:
    The `scoring.Report`.
  """
  from ec2t_jax.training import train  # Local: keeps `--help` fast.

  run = train.load_workdir(workdir, best=best)
  return scoring.count(
    run.model,
    run.variables,
    input_shape=run.image_shape,
    mode=mode,
    ternary_mask=run.ternary_mask,
    dataset=run.config.get('dataset'),
    **kwargs,
  )


def main(argv: Sequence[str] | None = None) -> int:
  """Command line entry point (``python -m ec2t_jax.scoring --help``)."""
  parser = argparse.ArgumentParser(
    prog='python -m ec2t_jax.scoring', description=__doc__.split('\n\n')[0]
  )
  parser.add_argument('--workdir', required=True, help='a workdir of main.py / train_and_evaluate')
  parser.add_argument('--mode', default='corrected', choices=scoring.MODES)
  parser.add_argument('--best', action='store_true', help='the best-by-validation checkpoint')
  parser.add_argument('--mul-bits', type=int, default=16)
  parser.add_argument('--add-bits', type=int, default=32)
  parser.add_argument('--storage-bits', type=int, default=16)
  parser.add_argument(
    '--no-half-precision', action='store_true', help='store values in 32 bits instead'
  )
  parser.add_argument('--no-tree-adder', action='store_true')
  parser.add_argument('--json', default='', help='also write the report as JSON to this file')
  args = parser.parse_args(argv)
  logging.getLogger('absl').setLevel(logging.WARNING)
  try:
    report = score_workdir(
      args.workdir,
      mode=args.mode,
      best=args.best,
      mul_bits=args.mul_bits,
      add_bits=args.add_bits,
      storage_bits=args.storage_bits,
      half_precision=not args.no_half_precision,
      tree_adder=not args.no_tree_adder,
    )
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(report.format())
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(
        {
          'mode': report.mode,
          'settings': {k: v for k, v in report.settings.items()},
          'totals': report.totals,
          'rows': [dataclasses.asdict(r) for r in report.rows],
          'warnings': report.warnings,
        },
        f,
        indent=1,
        default=list,
      )
  return 0


if __name__ == '__main__':
  sys.exit(main())
