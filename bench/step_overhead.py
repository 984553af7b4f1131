"""Train step with `ec2t_jax.ec2t` against plain `optax.adam`, one model (kept for old commands).

    python bench/step_overhead.py [--model resnet20] [--batch 128] [--steps 30] [--dtype float32]

The same measurement as `python bench/performance.py step --models MODEL --dtypes DTYPE`,
which it runs: both steps in one process, interleaved, medians and their ratio.
The older GPU outputs in `bench/results/gpu_2026-11-27/` were written by an earlier version of
this script (fields `adam_median_s`, `ec2t_median_s`, `compile_s`).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import performance  # noqa: E402


def main(argv=None):
  """Parses the old flags and runs `performance.py step` with them."""
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--model', default='resnet20')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=30, help='timed steps per optimizer')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--json', default='', help='also write the result to this file')
  args = parser.parse_args(argv)
  (result,) = performance.main(
    [
      'step',
      f'--models={args.model}',
      f'--dtypes={args.dtype}',
      f'--batch={args.batch}',
      f'--steps={args.steps}',
      f'--json={args.json}',
    ]
  )
  return result


if __name__ == '__main__':
  main()
