"""The command line ``python -m ec2t_jax.export``: a workdir's checkpoint as a file, and its sizes.

``--format ec2t`` (the default) writes this package's file, ``--format onnx`` an ONNX
model (`ec2t_jax.onnx_export`, imported only then: the ``[onnx]`` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from ec2t_jax import cli, files, tree_util
from ec2t_jax.export.model import run_model_info
from ec2t_jax.export.writer import dumps
from ec2t_jax.export_leaves import ternary_leaves

__all__ = ['main']


def _kb(n: float) -> str:
  """Bytes as KiB (1024 bytes) with one decimal, as report.md writes them."""
  return f'{n / 1024:,.1f} KiB'


def _write_onnx(onnx_export: Any, run: Any, out: str) -> int:
  """`main`'s ``--format onnx``: the run's network with its input normalization, as ONNX."""
  info = run_model_info(run)
  try:
    proto = onnx_export.to_onnx(
      run.model,
      run.variables,
      run.image_shape,
      ternary_leaves=ternary_leaves(run.variables, run.opt_state),
      normalization=run.normalization,
      metadata={'ec2t_jax.model': info},
    )
    size = onnx_export.save(out, proto)
  except (ValueError, NotImplementedError, OSError, onnx_export.onnx.checker.ValidationError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 2
  tern = onnx_export.ternary_initializers(proto)
  props = {p.key: json.loads(p.value) for p in proto.metadata_props}
  folded = props['ec2t_jax.folded_batch_norms']
  float32 = sum(np.asarray(v).size * 4 for _, v in tree_util.named_leaves(run.variables))
  shape = ', '.join(str(d) for d in run.image_shape)
  print(
    f'checkpoint {run.step}: {len(tern)} ternary kernels stored as int8, '
    f'{len(folded)} BatchNorms folded into their convolutions'
  )
  scaling = (
    "on [0, 1], the run's (x - mean) / std computed in the graph"
    if run.normalization
    else 'on [0, 1], without normalization (the checkpoint records none)'
  )
  print(
    f'input images: float32 (batch, {shape}) {scaling}; output logits (batch, {run.num_classes})'
  )
  print(f'wrote {out} (onnx, {size:,d} bytes = {_kb(size)}; float32 checkpoint {_kb(float32)})')
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Exports a workdir's newest (or best) checkpoint and prints the sizes."""
  from ec2t_jax import export  # The package, whose docstring describes the file.

  parser = argparse.ArgumentParser(
    prog='python -m ec2t_jax.export', description=export.__doc__.split('\n\n')[0]
  )
  parser.add_argument('--workdir', required=True, help='a workdir of main.py / train_and_evaluate')
  parser.add_argument('--out', required=True, help='the file to write')
  parser.add_argument(
    '--format',
    choices=('ec2t', 'onnx'),
    default='ec2t',
    help="ec2t: this module's file; onnx: an ONNX model with int8 ternary kernels "
    '(docs/onnx.md; --entropy-coding, --fp16 and --fp16-centroids are refused with it)',
  )
  parser.add_argument(
    '--entropy-coding',
    action='store_true',
    help='write the range-coded file instead of the packed (mask + sign bits) one',
  )
  parser.add_argument('--fp16', action='store_true', help='full-precision leaves in float16')
  parser.add_argument(
    '--fp16-centroids', action='store_true', help='centroids in float16 (not bit-exact)'
  )
  parser.add_argument('--best', action='store_true', help='the best-by-validation checkpoint')
  args = parser.parse_args(argv)
  if args.format == 'onnx':
    for flag in ('entropy_coding', 'fp16', 'fp16_centroids'):
      if getattr(args, flag):
        option = '--' + flag.replace('_', '-')
        print(f'error: {option} applies to --format ec2t only, got --format onnx', file=sys.stderr)
        return 2
  problem = cli.output_path_error('--out', args.out)
  if problem:
    print(problem, file=sys.stderr)
    return 2
  if args.format == 'onnx':
    try:
      from ec2t_jax import onnx_export  # Local: an optional extra.
    except ImportError:
      print("error: --format onnx needs onnx: pip install 'ec2t_jax[onnx]'", file=sys.stderr)
      return 2
  from ec2t_jax.training import workdir as workdir_lib  # Local: keeps `--help` fast.

  progress = workdir_lib.progress_printer('export')
  try:
    run = workdir_lib.load_workdir(
      args.workdir, best=args.best, progress=progress, compilation_cache=True
    )
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.format == 'onnx':
    if progress is not None:
      progress(f'converting checkpoint {run.step} to ONNX')
    return _write_onnx(onnx_export, run, args.out)
  options = dict(
    fp_dtype='float16' if args.fp16 else 'float32',
    centroid_dtype='float16' if args.fp16_centroids else 'float32',
    model=run_model_info(run),
  )
  if progress is not None:
    progress(f'packing checkpoint {run.step}, with and without entropy coding')
  try:
    packed, p_stats = dumps(run.variables, run.opt_state, entropy_coding=False, **options)
    coded, e_stats = dumps(run.variables, run.opt_state, entropy_coding=True, **options)
    data = coded if args.entropy_coding else packed
    files.replace_file(args.out, data)  # A failed write leaves an old file whole.
  except (ValueError, OSError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 2
  ref = p_stats.float32_bytes
  print(
    f'checkpoint {run.step}: {p_stats.ternary_leaves} ternary leaves '
    f'({p_stats.num_ternary:,d} weights); full-precision leaves in {options["fp_dtype"]}, '
    f'centroids in {options["centroid_dtype"]}'
  )
  if not p_stats.ternary_leaves:
    if not run.schedule.compressed_at(run.step):
      print(
        f'note: checkpoint {run.step} is in the full-precision stage (EC2T starts at step '
        f'{run.schedule.compression_start}): every leaf is stored as full precision'
      )
  if p_stats.float32_leaves:
    print(
      'kept in float32 (float16 cannot hold their values within 2^-11): '
      + ', '.join(p_stats.float32_leaves)
    )
  # The sizes of the files this command writes with these options (the written one and
  # the other kind), byte for byte; report.md lists those of `--fp16`.
  print(f'{"":<24} {"bytes":>12} {"size":>14} {"ratio":>8}')
  for label, size in (
    ('float32 checkpoint', ref),
    ('packed (mask + sign)', p_stats.total_bytes),
    ('entropy coded', e_stats.total_bytes),
  ):
    print(f'{label:<24} {size:>12,d} {_kb(size):>14} {ref / size:>7.1f}x')
  bound = e_stats.entropy_bound_bits
  overhead = (
    f'coded {100 * (e_stats.ternary_payload_bits / bound - 1):+.2f}%' if bound > 0 else 'no bound'
  )
  print(
    f'ternary payload: packed {p_stats.ternary_payload_bits:,d} bits, entropy coded '
    f'{e_stats.ternary_payload_bits:,d} bits, sum N*H(P) = {bound:,.0f} bits ({overhead})'
  )
  kind = 'entropy coded' if args.entropy_coding else 'packed'
  print(f'wrote {args.out} ({kind}, {len(data):,d} bytes = {_kb(len(data))})')
  return 0
