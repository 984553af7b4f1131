"""EC2T against the BitNet b1.58 absmean baseline, from one full-precision network.

    python bench/ternary_methods.py --model vit --gammas 0,0.15,0.3,0.6 --init_scales 0.6,0.8 \
        --workdir cmp/vit
    python bench/ternary_methods.py --model lenet5 --gammas 0,0.15,0.3,0.6 --workdir cmp/lenet5

For one model of the embedded MNIST (`--model vit`: `configs/mnist.py:vit`; `--model
lenet5`: `configs/mnist.py`), this

1. runs the EC2T γ sweep (`python -m ec2t_jax.sweep`, which trains the full-precision part
   once, in `WORKDIR/ec2t/fp/`, and one EC2T + frozen run per γ from it);
2. trains the absmean baseline (`config.method='absmean'`) from the same full-precision
   variables with the same EC2T and frozen epochs (`WORKDIR/absmean/`);
3. exports every run with entropy coding (`ec2t_jax.export.dumps`, written to
   `WORKDIR/<run>.ec2t`) and reads test accuracy and sparsity from its `summary.json`;
4. writes `WORKDIR/methods.md` (the table), `WORKDIR/methods.json` (the numbers) and
   `WORKDIR/methods_accuracy_vs_size.png` (test accuracy against the bits per ternary
   weight of the coded file).

Every step is a subprocess of the ordinary commands, so a rerun resumes: finished sweep
points and a finished absmean run are not trained again. `--smoke` uses the tiny
`:smoke` / `:vit_smoke` recipes (for tests).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {
  'vit': ('configs/mnist.py:vit', 'configs/mnist.py:vit_smoke'),
  'lenet5': ('configs/mnist.py', 'configs/mnist.py:smoke'),
}


def _run(argv: list[str], log: str) -> None:
  """Runs one command of the pipeline, its output appended to `log`; raises if it fails."""
  print('$ ' + ' '.join(argv), flush=True)
  with open(log, 'a') as f:
    f.write('$ ' + ' '.join(argv) + '\n')
    f.flush()
    done = subprocess.run(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False)
  if done.returncode:
    raise SystemExit(f'error: {argv[1:3]} exited with {done.returncode}; see {log}')


def _gamma_label(gamma: float) -> str:
  return f'{gamma:g}'


def _measure(workdir: str, out_file: str) -> dict[str, Any]:
  """Test accuracy, sparsity and the entropy-coded export of one finished run."""
  from ec2t_jax import export
  from ec2t_jax.training import workdir as workdir_lib

  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  run = workdir_lib.load_workdir(workdir)
  data, stats = export.dumps(
    run.variables, run.opt_state, entropy_coding=True, model=export.run_model_info(run)
  )
  with open(out_file, 'wb') as f:
    f.write(data)
  return {
    'workdir': workdir,
    'file': out_file,
    'test_accuracy': summary['test_accuracy'],
    'fp_test_accuracy': summary.get('fp_test_accuracy'),
    'sparsity': summary['sparsity'],
    'ternary_weights': stats.num_ternary,
    'ternary_bits': stats.ternary_payload_bits,
    'bits_per_ternary_weight': stats.ternary_payload_bits / max(stats.num_ternary, 1),
    'file_bytes': len(data),
    'float32_bytes': stats.float32_bytes,
  }


def _table(rows: list[dict[str, Any]]) -> str:
  lines = [
    '| method | γ | s | test acc | sparsity | bits / ternary weight | ternary weights KiB | '
    'file KiB | float32 KiB |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    lines.append(
      f'| {r["method"]} | {r["gamma"]} | {r["init_scale"]} | {r["test_accuracy"]:.4f} | '
      f'{100 * r["sparsity"]:.2f}% | '
      f'{r["bits_per_ternary_weight"]:.3f} | {r["ternary_bits"] / 8 / 1024:.2f} | '
      f'{r["file_bytes"] / 1024:.2f} | {r["float32_bytes"] / 1024:.1f} |'
    )
  return '\n'.join(lines)


def _plot(rows: list[dict[str, Any]], title: str, path: str) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(5.5, 3.8))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  ec2t = [r for r in rows if r['method'] == 'ec2t']
  for init_scale in dict.fromkeys(r['init_scale'] for r in ec2t):
    line = sorted((r for r in ec2t if r['init_scale'] == init_scale), key=lambda r: r['gamma'])
    ax.plot(
      [r['bits_per_ternary_weight'] for r in line],
      [100 * r['test_accuracy'] for r in line],
      'o-',
      label=f'EC2T, s={init_scale:g} (γ sweep)',
    )
    for r in line:
      ax.annotate(
        f' γ={r["gamma"]:g}', (r['bits_per_ternary_weight'], 100 * r['test_accuracy']), fontsize=7
      )
  base = [r for r in rows if r['method'] == 'absmean']
  ax.plot(
    [r['bits_per_ternary_weight'] for r in base],
    [100 * r['test_accuracy'] for r in base],
    's',
    color='C3',
    label='absmean (BitNet b1.58)',
  )
  fp = rows[0].get('fp_test_accuracy')
  if fp:
    ax.axhline(100 * fp, color='gray', ls=':', label='full precision')
  ax.set_xlabel('entropy-coded bits per ternary weight')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  """Runs the comparison for one model and writes its table, numbers and plot."""
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--model', choices=sorted(CONFIGS), required=True)
  parser.add_argument('--gammas', default='0,0.15,0.3,0.6', help='EC2T entropy gains')
  parser.add_argument(
    '--init_scales', default='', help="EC2T initial centroid scales s (the recipe's if unset)"
  )
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--smoke', action='store_true', help='the tiny :smoke recipes (tests)')
  parser.add_argument(
    '--override', action='append', default=[], help='--config.x=y for every run (repeatable)'
  )
  args = parser.parse_args(argv)
  try:
    gammas = [float(g) for g in args.gammas.split(',') if g.strip()]
    scales = [float(x) for x in args.init_scales.split(',') if x.strip()]
  except ValueError:
    parser.error(
      f'--gammas and --init_scales must be comma-separated numbers, got {args.gammas!r} '
      f'and {args.init_scales!r}'
    )
  if not gammas:
    parser.error('--gammas is empty; give e.g. 0,0.15,0.3')
  config = CONFIGS[args.model][1 if args.smoke else 0]
  workdir = os.path.abspath(args.workdir)
  os.makedirs(workdir, exist_ok=True)
  log = os.path.join(workdir, 'log.txt')

  from ec2t_jax import sweep
  from ec2t_jax.configs import mnist

  recipe = mnist.get_config(config.partition(':')[2])
  scales = scales or [recipe.ec2t.init_scale]
  sweep_dir = os.path.join(workdir, 'ec2t')
  _run(
    [
      sys.executable,
      '-m',
      'ec2t_jax.sweep',
      f'--config={config}',
      f'--gammas={",".join(_gamma_label(g) for g in gammas)}',
      f'--init_scales={",".join(f"{x:g}" for x in scales)}',
      f'--workdir={sweep_dir}',
      *args.override,
    ],
    log,
  )
  absmean_dir = os.path.join(workdir, 'absmean')
  absmean_args = [
    f'--config={config}',
    f'--workdir={absmean_dir}',
    '--config.method=absmean',
    f'--config.init_from={os.path.join(sweep_dir, "fp", "fp_variables")}',
    '--config.fp.num_epochs=0',
    *args.override,
  ]
  # The sweep refuses another base config in its directory; the absmean run is checked
  # against the arguments it was trained with, so a rerun never mixes stale results in.
  recorded = os.path.join(workdir, 'absmean_args.json')
  if os.path.exists(recorded):
    with open(recorded) as f:
      before = json.load(f)
    if before != absmean_args:
      raise SystemExit(
        f'error: {absmean_dir!r} was trained with {before}, not {absmean_args}; use another '
        '--workdir (or delete it) to compare another configuration'
      )
  if not os.path.exists(os.path.join(absmean_dir, 'summary.json')):
    with open(recorded, 'w') as f:
      json.dump(absmean_args, f)
    _run([sys.executable, 'main.py', *absmean_args], log)
  rows = []
  for init_scale in scales:
    for gamma in gammas:
      name = sweep.point_name(gamma, init_scale)
      row = _measure(os.path.join(sweep_dir, name), os.path.join(workdir, f'ec2t_{name}.ec2t'))
      rows.append({'method': 'ec2t', 'gamma': gamma, 'init_scale': init_scale, **row})
  row = _measure(absmean_dir, os.path.join(workdir, 'absmean.ec2t'))
  rows.append({'method': 'absmean', 'gamma': '-', 'init_scale': '-', **row})
  dataset = recipe.dataset
  for override in args.override:
    if override.startswith('--config.dataset='):
      dataset = override.partition('=')[2]
  title = f'{args.model} on {os.path.basename(dataset)}: EC2T vs absmean'
  _plot(rows, title, os.path.join(workdir, 'methods_accuracy_vs_size.png'))
  table = _table(rows)
  with open(os.path.join(workdir, 'methods.md'), 'w') as f:
    f.write(f'# {title}\n\nConfig `{config}`.\n\n{table}\n')
  with open(os.path.join(workdir, 'methods.json'), 'w') as f:
    json.dump({'model': args.model, 'config': config, 'rows': rows}, f, indent=1)
  print(table, flush=True)
  return rows


if __name__ == '__main__':
  main()
