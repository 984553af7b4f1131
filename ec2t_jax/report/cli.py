"""A Markdown report with figures of one or more EC2T runs.

The command line of `ec2t_jax.report` (``python -m ec2t_jax.report --help``); the first
paragraph of this docstring is its description.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from ec2t_jax.report.markdown import write_report


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
