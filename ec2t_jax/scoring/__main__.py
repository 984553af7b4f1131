"""Prints the MicroNet-rules cost of a trained run (``ec2t_jax.scoring.count``).

EC2T (Marban et al., CVPR-W 2020, arXiv 2004.01077) reports scoring
parameters, multiplications, additions and the MicroNet score; this command
computes them for the newest (or best) checkpoint of a workdir (the rules:
docs/scoring.md)::

    python -m ec2t_jax.scoring --workdir /tmp/wd_mnist
    python -m ec2t_jax.scoring --workdir /tmp/wd_mnist --mode reference --best --json cost.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from ec2t_jax import cli, files, scoring

__all__ = ['main', 'score_workdir']


def score_workdir(
  workdir: str,
  *,
  mode: str = 'corrected',
  best: bool = False,
  image_size: int | None = None,
  **kwargs,
) -> scoring.Report:
  """`scoring.count` of a workdir's newest (or best-by-validation) checkpoint.

  Args:
    workdir: a directory written by `ec2t_jax.training.train.train_and_evaluate`.
    mode: ``'corrected'`` or ``'reference'``.
    best: score the best-by-validation checkpoint.
    image_size: the input side to count at; None = the run's `config.score_image_size`,
      or its training image size when that is 0 (EfficientNet-B1 is scored at 256).
    **kwargs: further `scoring.count` options (``mul_bits``, ``half_precision``, ...).

  A leaf of the run's ternary mask counts as ternary only if its values are
  (`tree_util.is_ternary`): a checkpoint of the full-precision stage, or a
  leaf that did not become ternary, is scored as full precision, and the
  report's warnings say so.

  Returns:
    The `scoring.Report`.
  """
  from ec2t_jax.training import workdir as workdir_lib

  run = workdir_lib.load_workdir(workdir, best=best)
  return _score_run(run, mode=mode, image_size=image_size, **kwargs)


def _score_run(run: Any, *, mode: str, image_size: int | None, **kwargs) -> scoring.Report:
  """`score_workdir` of a run read already."""
  image_size = image_size or run.config.get('score_image_size') or None
  report = scoring.count_run(run, mode=mode, image_size=image_size, **kwargs)
  if not run.schedule.compressed_at(run.step):
    report.warnings.insert(
      0,
      f'checkpoint {run.step} is in the full-precision stage (EC2T starts at step '
      f'{run.schedule.compression_start}): every layer is scored as full precision',
    )
  return report


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog='python -m ec2t_jax.scoring', description=__doc__.split('\n\n')[0]
  )
  parser.add_argument('--workdir', required=True, help='a workdir of main.py / train_and_evaluate')
  parser.add_argument(
    '--mode',
    default='corrected',
    choices=scoring.MODES,
    help='corrected: every operation counted; reference: the published counter and its quirks '
    '(default: %(default)s)',
  )
  parser.add_argument('--best', action='store_true', help='the best-by-validation checkpoint')
  parser.add_argument(
    '--mul-bits',
    type=int,
    default=16,
    help='bits of a multiplication; one counts mul_bits/32 (default: %(default)s)',
  )
  parser.add_argument(
    '--add-bits',
    type=int,
    default=32,
    help='bits of an addition; one counts add_bits/32 (default: %(default)s)',
  )
  parser.add_argument(
    '--storage-bits',
    type=int,
    default=16,
    help="bits of a stored value, and the adder tree's first level (default: %(default)s)",
  )
  parser.add_argument(
    '--no-half-precision',
    action='store_true',
    help='store values (and start adder trees) at 32 bits instead of --storage-bits',
  )
  parser.add_argument(
    '--no-tree-adder',
    action='store_true',
    help='count every addition of a ternary layer at --add-bits instead of as an adder tree '
    'that widens by one bit per level',
  )
  parser.add_argument(
    '--image-size',
    type=int,
    default=None,
    help="input side to count at (default: the run's config.score_image_size, else its "
    'training image size)',
  )
  parser.add_argument('--json', default='', help='also write the report as JSON to this file')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Command line entry point (``python -m ec2t_jax.scoring --help``)."""
  args = _parser().parse_args(argv)
  problem = args.json and cli.output_path_error('--json', args.json)
  if problem:
    print(problem, file=sys.stderr)
    return 2
  logging.getLogger('absl').setLevel(logging.WARNING)
  from ec2t_jax.training import workdir as workdir_lib

  try:
    run = workdir_lib.load_workdir(
      args.workdir,
      best=args.best,
      progress=workdir_lib.progress_printer('scoring'),
      compilation_cache=True,
    )
    report = _score_run(
      run,
      mode=args.mode,
      image_size=args.image_size,
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
    files.replace_file(args.json, json.dumps(report.as_dict(), indent=1, default=list))
  return 0


if __name__ == '__main__':
  sys.exit(main())
