"""Every compression method with and without distillation, from one full-precision network.

    python bench/distillation.py --model lenet5 --workdir kd/mnist
    python bench/distillation.py --model lenet5 --override=--config.dataset=npz:fashion.npz \
        --workdir kd/fashion
    python bench/distillation.py --model vit --gammas 0.3 --init_scales 0.8 --workdir kd/vit

For one model of `configs/mnist.py` (`lenet5`: the default recipe; `vit`: `:vit`), this

1. trains the full-precision network once (`WORKDIR/fp`, the recipe's fp epochs);
2. trains from it, at every seed of `--seeds`, each method of `--methods` (EC2T over the
   grid `--gammas` x `--init_scales`; absmean and TWN once) with the recipe's EC2T and
   frozen epochs, once without and once with each distillation setting of `--distill`
   (a setting is `w=<weight>,T=<temperature>` and optionally `,stages=<names joined by
   +>` and `,teacher=<workdir>`, e.g. `--distill w=0.9,T=1 --distill
   w=0.9,T=1,stages=frozen`; the teacher is the full-precision network of step 1,
   `config.distill.teacher='fp'`, unless `teacher=` names the workdir of another finished
   run, e.g. a wider network trained on the same data);
3. exports every run with entropy coding and reads its accuracy, sparsity and coded bits
   per ternary weight (as `bench/ternary_methods.py` does);
4. writes `WORKDIR/distillation.md` (mean and spread over the seeds of each point),
   `WORKDIR/distillation.json` (every run) and `WORKDIR/distillation_front.png` (test
   accuracy against coded bits per ternary weight, every method with and without).

Every run is a subprocess of `main.py`, so a rerun skips finished runs and resumes a
stopped one. `--smoke` uses the tiny `:smoke` / `:vit_smoke` recipes (tests).
`--include OTHER/distillation.json` (repeatable) adds the runs of an earlier invocation
on the same model and data to the table, the numbers and the front, so that one picture
shows every method, e.g. the EC2T grid of one invocation beside absmean and TWN of
another; with `--methods none` nothing is trained and only the included runs are shown.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ternary_methods  # noqa: E402  (its runner, configs and the export measurement)

METHODS = ('ec2t', 'absmean', 'twn')


def _numbers(text: str, flag: str, cast=float) -> list:
  try:
    values = [cast(x) for x in text.split(',') if x.strip()]
  except ValueError:
    raise SystemExit(f'error: {flag} must be comma-separated numbers, got {text!r}') from None
  if not values:
    raise SystemExit(f'error: {flag} is empty')
  return values


def _points(methods, gammas, scales) -> list[tuple[str, Any, Any]]:
  points = []
  for method in methods:
    if method == 'ec2t':
      points += [('ec2t', g, s) for s in scales for g in gammas]
    else:
      points.append((method, '-', '-'))
  return points


def _setting(text: str) -> dict[str, Any]:
  """`'w=0.9,T=1[,stages=frozen][,teacher=DIR]'` as a dict of the setting and its label.

  Keys: `weight`, `temperature`, `stages` (`''`: every compressing stage), `teacher`
  (`'fp'`, the run's own full-precision network, or a path given with `teacher=`)
  and `label`.
  """
  fields = dict(part.partition('=')[::2] for part in text.split(',') if part.strip())
  unknown = sorted(set(fields) - {'w', 'T', 'stages', 'teacher'})
  if unknown or 'w' not in fields or 'T' not in fields:
    raise SystemExit(
      f'error: --distill {text!r}: expected w=<weight>,T=<temperature>[,stages=a+b]'
      "[,teacher=<workdir>], e.g. 'w=0.5,T=4' or 'w=0.9,T=1,stages=frozen'"
    )
  try:
    weight, temperature = float(fields['w']), float(fields['T'])
  except ValueError:
    raise SystemExit(f'error: --distill {text!r}: w and T must be numbers') from None
  stages = fields.get('stages', '')
  teacher = fields.get('teacher', '') or 'fp'
  if teacher != 'fp':
    teacher = os.path.abspath(teacher)
    if not os.path.exists(teacher):
      raise SystemExit(
        f'error: --distill {text!r}: teacher {teacher} does not exist; give the workdir of a '
        'finished main.py run (or leave teacher= out for the full-precision network)'
      )
  label = f'w={weight:g}, T={temperature:g}' + (f', {stages}' if stages else '')
  if teacher != 'fp':
    label += f', teacher {os.path.basename(teacher)}'
  return {
    'weight': weight,
    'temperature': temperature,
    'stages': stages,
    'teacher': teacher,
    'label': label,
  }


def _name(method, gamma, scale, seed, setting) -> str:
  grid = f'_g{gamma:g}_s{scale:g}' if method == 'ec2t' else ''
  if setting is None:
    return f'{method}{grid}_seed{seed}'
  kd = f'_kd_w{setting["weight"]:g}_T{setting["temperature"]:g}'
  if setting['stages']:
    kd += f'_{setting["stages"]}'
  if setting['teacher'] != 'fp':
    kd += f'_t{os.path.basename(setting["teacher"])}'  # `_setting` made it absolute.
  return f'{method}{grid}_seed{seed}{kd}'


def _included(path: str, model: str, config: str) -> list[dict[str, Any]]:
  """The rows of an earlier invocation's `distillation.json`, checked to be of `model`."""
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise SystemExit(
      f'error: --include {path}: {e}; give a distillation.json of this command'
    ) from None
  if (data.get('model'), data.get('config')) != (model, config):
    raise SystemExit(
      f'error: --include {path} holds runs of --model {data.get("model")!r} '
      f'({data.get("config")}), not of --model {model!r} ({config}); include only runs '
      'of the same model and recipe'
    )
  # Its folder and name (`fashion_grid/distillation.json`): no machine's paths in the rows.
  source = os.path.join(*os.path.abspath(path).split(os.sep)[-2:])
  return [{**r, 'included_from': source} for r in data['rows']]


def _refuse_duplicates(rows: list[dict[str, Any]]) -> None:
  """Exits naming the first run that two sources both hold (it would count twice)."""
  seen: dict[tuple, str] = {}
  for r in rows:
    key = (r['method'], r['gamma'], r['init_scale'], r['seed'], r['distilled'])
    source = r.get('included_from', 'this invocation')
    if key in seen:
      raise SystemExit(
        f'error: the run {key} is both in {seen[key]} and in {source}; include each run once'
      )
    seen[key] = source


def _summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean and spread (sample standard deviation) over the seeds of each point.

  A point is a method, its (γ, s) and its distillation (`''` or a setting's label).
  """
  groups: dict[tuple, list[dict[str, Any]]] = {}
  for r in rows:
    groups.setdefault((r['method'], r['gamma'], r['init_scale'], r['distilled']), []).append(r)
  out = []
  for (method, gamma, scale, distilled), runs in groups.items():

    def stat(key, runs=runs):
      values = [float(r[key]) for r in runs]
      spread = statistics.stdev(values) if len(values) > 1 else 0.0
      return statistics.fmean(values), spread

    out.append(
      {
        'method': method,
        'gamma': gamma,
        'init_scale': scale,
        'distilled': distilled,
        'seeds': len(runs),
        'test_accuracy': stat('test_accuracy'),
        'sparsity': stat('sparsity'),
        'bits_per_ternary_weight': stat('bits_per_ternary_weight'),
        'accuracy_by_seed': {r['seed']: float(r['test_accuracy']) for r in runs},
      }
    )
  return out


def _gain(point: dict[str, Any], base: dict[str, Any]) -> tuple[float, float] | None:
  """Test accuracy gained over `base` (pp): mean and sd of the per-seed differences.

  Each seed's distilled run is compared with the run of the same seed without
  distillation (same initialization and data order); None without a common seed.
  """
  mine, theirs = point['accuracy_by_seed'], base['accuracy_by_seed']
  diffs = [100 * (mine[s] - theirs[s]) for s in mine if s in theirs]
  if not diffs:
    return None
  spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
  return statistics.fmean(diffs), spread


def _table(points: list[dict[str, Any]]) -> str:
  lines = [
    '| method | γ | s | distillation | seeds | test acc (mean ± sd) | sparsity | '
    'bits / ternary weight | gain from distillation (pp, same seeds) |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  plain = {(p['method'], p['gamma'], p['init_scale']): p for p in points if not p['distilled']}
  for p in points:
    acc, acc_sd = p['test_accuracy']
    gain = ''
    base = plain.get((p['method'], p['gamma'], p['init_scale']))
    paired = _gain(p, base) if p['distilled'] and base is not None else None
    if paired is not None:
      gain = f'{paired[0]:+.2f} ± {paired[1]:.2f}'
    lines.append(
      f'| {p["method"]} | {p["gamma"]} | {p["init_scale"]} | {p["distilled"] or "none"} '
      f'| {p["seeds"]} | {100 * acc:.2f} ± {100 * acc_sd:.2f} | '
      f'{100 * p["sparsity"][0]:.2f}% | {p["bits_per_ternary_weight"][0]:.3f} | {gain} |'
    )
  return '\n'.join(lines)


# One marker per distillation setting: without (open square), then each setting in order.
_MARKERS = ('s--', 'o-', '^-', 'v-', 'D-', 'P-', 'X-', '*-', 'h-', '<-', '>-')


def _front(points: list[dict[str, Any]]) -> list[tuple[float, float]]:
  """(bits, accuracy %) of the points that no point of fewer bits beats in accuracy."""
  front: list[tuple[float, float]] = []
  for p in sorted(points, key=lambda p: (p['bits_per_ternary_weight'][0], -p['test_accuracy'][0])):
    bits, acc = p['bits_per_ternary_weight'][0], 100 * p['test_accuracy'][0]
    if not front or acc > front[-1][1]:
      front.append((bits, acc))
  return front


def _plot(points: list[dict[str, Any]], title: str, path: str) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6.0, 4.8))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  colors = {'ec2t': 'C0', 'absmean': 'C3', 'twn': 'C2'}
  for method in dict.fromkeys(p['method'] for p in points):
    for k, distilled in enumerate(dict.fromkeys(p['distilled'] for p in points)):
      mine = [p for p in points if p['method'] == method and p['distilled'] == distilled]
      if not mine:
        continue
      mine.sort(key=lambda p: p['bits_per_ternary_weight'][0])
      style = _MARKERS[k % len(_MARKERS)]
      marker, line = style[0], style[1:]
      color = colors.get(method, 'C7')
      ax.errorbar(
        [p['bits_per_ternary_weight'][0] for p in mine],
        [100 * p['test_accuracy'][0] for p in mine],
        yerr=[100 * p['test_accuracy'][1] for p in mine],
        fmt=marker,
        color=color,
        mfc=color if distilled else 'none',
        capsize=2,
        label=f'{method}' + (f' + distillation ({distilled})' if distilled else ''),
      )
      front = _front(mine)  # The line joins only the points no other point beats.
      ax.plot([p[0] for p in front], [p[1] for p in front], line, color=color, lw=1)
  ax.set_xlabel('entropy-coded bits per ternary weight')
  ax.set_ylabel('test accuracy (%, mean ± sd over seeds)')
  ax.set_title(title)
  ax.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  """Trains and measures every point; writes the table, the numbers and the front."""
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--model', choices=sorted(ternary_methods.CONFIGS), required=True)
  parser.add_argument('--methods', default=','.join(METHODS))
  parser.add_argument('--gammas', default='0,0.15,0.3')
  parser.add_argument('--init_scales', default='0.3,0.5')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument(
    '--distill',
    action='append',
    default=[],
    help="a distillation setting 'w=<weight>,T=<temperature>[,stages=a+b][,teacher=DIR]' "
    "(repeatable; default 'w=0.5,T=4')",
  )
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--smoke', action='store_true', help='the tiny :smoke recipes (tests)')
  parser.add_argument(
    '--override', action='append', default=[], help='--config.x=y for every run (repeatable)'
  )
  parser.add_argument(
    '--include',
    action='append',
    default=[],
    help='the distillation.json of an earlier invocation on the same model and data: its '
    'runs join the table and the front (repeatable)',
  )
  args = parser.parse_args(argv)
  methods = [m.strip() for m in args.methods.split(',') if m.strip() not in ('', 'none')]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise SystemExit(f'error: --methods names {unknown}; valid: {",".join(METHODS)}')
  gammas = _numbers(args.gammas, '--gammas')
  scales = _numbers(args.init_scales, '--init_scales')
  seeds = _numbers(args.seeds, '--seeds', int)
  settings = [_setting(text) for text in args.distill or ['w=0.5,T=4']]
  config = ternary_methods.CONFIGS[args.model][1 if args.smoke else 0]
  if not methods and not args.include:
    raise SystemExit('error: nothing to show: --methods none and no --include')
  included = [r for path in args.include for r in _included(path, args.model, config)]
  workdir = os.path.abspath(args.workdir)
  os.makedirs(os.path.join(workdir, 'runs'), exist_ok=True)
  log = os.path.join(workdir, 'log.txt')
  python = sys.executable
  fp_dir = os.path.join(workdir, 'fp')
  if methods and not os.path.exists(os.path.join(fp_dir, 'summary.json')):
    ternary_methods._run(
      [
        python,
        'main.py',
        f'--config={config}',
        f'--workdir={fp_dir}',
        '--config.ec2t.num_epochs=0',
        '--config.ec2t.frozen_epochs=0',
        *args.override,
      ],
      log,
    )
  init_from = os.path.join(fp_dir, 'fp_variables')
  rows = list(included)
  for seed in seeds:
    for method, gamma, scale in _points(methods, gammas, scales):
      for setting in (None, *settings):
        name = _name(method, gamma, scale, seed, setting)
        run_dir = os.path.join(workdir, 'runs', name)
        argv = [
          python,
          'main.py',
          f'--config={config}',
          f'--workdir={run_dir}',
          f'--config.init_from={init_from}',
          '--config.fp.num_epochs=0',
          f'--config.seed={seed}',
          f'--config.method={method}',
          *args.override,
        ]
        if method == 'ec2t':
          argv += [f'--config.ec2t.gamma={gamma:g}', f'--config.ec2t.init_scale={scale:g}']
        if setting is not None:
          argv += [
            f'--config.distill.teacher={setting["teacher"]}',
            f'--config.distill.weight={setting["weight"]:g}',
            f'--config.distill.temperature={setting["temperature"]:g}',
            f'--config.distill.stages={setting["stages"].replace("+", ",")}',
          ]
        if not os.path.exists(os.path.join(run_dir, 'summary.json')):
          ternary_methods._run(argv, log)
        row = ternary_methods._measure(run_dir, os.path.join(workdir, 'runs', f'{name}.ec2t'))
        # Relative to WORKDIR, where distillation.json lies: no machine's paths in it.
        row.update({k: os.path.relpath(row[k], workdir) for k in ('workdir', 'file')})
        rows.append(
          {
            'method': method,
            'gamma': gamma,
            'init_scale': scale,
            'seed': seed,
            'distilled': '' if setting is None else setting['label'],
            **row,
          }
        )
  _refuse_duplicates(rows)
  points = _summarize(rows)
  dataset = next(
    (o.partition('=')[2] for o in args.override if o.startswith('--config.dataset=')), 'mnist'
  )
  title = f'{args.model} on {os.path.basename(dataset)}: with and without distillation'
  _plot(points, title, os.path.join(workdir, 'distillation_front.png'))
  table = _table(points)
  with open(os.path.join(workdir, 'distillation.md'), 'w') as f:
    f.write(
      f'# {title}\n\nConfig `{config}` {" ".join(args.override)}; '
      + (
        f'distillation settings {"; ".join(s["label"] for s in settings)}; seeds {seeds}'
        if methods
        else 'no runs of its own'
      )
      + (f'; with the runs of {", ".join(args.include)}' if args.include else '')
      + f'.\n\n{table}\n'
    )
  with open(os.path.join(workdir, 'distillation.json'), 'w') as f:
    json.dump({'model': args.model, 'config': config, 'rows': rows}, f, indent=1)
  print(table, flush=True)
  return points


if __name__ == '__main__':
  main()
