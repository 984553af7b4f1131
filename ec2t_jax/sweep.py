"""A resumable sweep over the entropy gain γ and the initial centroid scale s.

    python -m ec2t_jax.sweep --config=configs/mnist.py --gammas 0,0.15,0.3 \\
        --init_scales 0.3,0.5 --workdir=DIR [--stages=name1,name2] [--config.x=y ...]

`--config` takes what `ec2t_jax.main` takes (a config file, or a packaged recipe such as
`mnist:smoke`), with the same `--config.x=y` overrides. The sweep writes into DIR:

* `fp/`: the full-precision part of the run (its leading full-precision stage),
  trained once; every point starts from its `fp/fp_variables` (`config.init_from`),
  with that part removed. A config without full-precision training has no `fp/`.
* `g<γ>_s<s>/`: one training workdir per point, e.g. `g0.15_s0.3/`.
* `sweep.json`: the base config and every point asked for so far.
* `sweep.md`, `sweep_accuracy_vs_sparsity.png`, `sweep_accuracy_vs_size.png`: the
  trade-off table and plots (`ec2t_jax.report.write_sweep_report`) of every finished point.

Rerunning the command continues a stopped sweep: finished points (those with a
`summary.json`) are skipped, a stopped point resumes from its checkpoint, and a larger
grid in the same DIR trains only the new points. A DIR is refused for a different base
config. γ and s are set on `config.ec2t`; with explicit stages (`config.stages`), also on
every stage of kind 'ec2t', or only on the stages that `--stages` names.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import ml_collections

import ec2t_jax
from ec2t_jax import main as main_lib
from ec2t_jax.training import stages as stages_lib

__all__ = [
  'FP_DIR',
  'SWEEP_FILE',
  'fp_part',
  'main',
  'parse_values',
  'point_config',
  'point_name',
  'run',
  'run_sweep',
]

FP_DIR = 'fp'
"""The sweep's subdirectory that trains the shared full-precision part."""
SWEEP_FILE = 'sweep.json'
"""The sweep's record of its base config and grid."""

# Stage kinds with settings of their own (γ and s live in config.ec2t's section).
_SWEPT_KINDS = tuple(k.name for k in stages_lib.KINDS.values() if k.settings == 'ec2t')
# The kinds a sweep sets γ and s on when --stages does not say: those that ternarize.
_DEFAULT_SWEPT = tuple(
  k.name for k in stages_lib.KINDS.values() if k.settings == 'ec2t' and k.ternarizes
)


# --- the configs of a sweep (pure functions of the config) ------------------------------------


def _explicit(config: ml_collections.ConfigDict) -> bool:
  """True if `config` names its stages (`config.stages` non-empty)."""
  return bool(config.get('stages'))


def _specs(config: ml_collections.ConfigDict):
  """The run's stages as the trainer reads them (`parse.stage_specs`), in order."""
  from ec2t_jax.training import parse as parse_lib  # Local: the trainer's imports are heavy.

  return parse_lib.stage_specs(config)


def _stage_order(config: ml_collections.ConfigDict) -> list[str]:
  """The stage names in the order they run."""
  return [spec.name for spec in _specs(config)]


def _leading_fp(config: ml_collections.ConfigDict) -> list[str]:
  """The names of the stages that open the run in full precision (kinds that do not compress)."""
  names = []
  for spec in _specs(config):
    if stages_lib.get(spec.kind).compresses:
      break
    names.append(spec.name)
  return names


def _copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """An unlocked deep copy of `config` (a config from the flags is locked)."""
  out = copy.deepcopy(config)
  out.unlock()
  return out


def _keep_stages(config: ml_collections.ConfigDict, names: Sequence[str]) -> None:
  """Restricts `config.stages` and `config.stage_order` to `names`, in place."""
  for name in list(config.stages.keys()):
    if name not in names:
      del config.stages[name]
  config.stage_order = ','.join(names)


def _set(config: ml_collections.ConfigDict, key: str, value: float) -> None:
  """`config[key] = value`, also where the field holds an int (ConfigDict refuses int → float)."""
  if key in config and not isinstance(config[key], float):
    del config[key]
  config[key] = value


def fp_part(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """The config of the run's full-precision part alone, or None if the run begins without one.

  Default form: `config.fp.num_epochs` of full precision, with `config.ec2t.num_epochs`
  and `config.ec2t.frozen_epochs` set to 0. Explicit stages (`config.stages`): the leading
  stages of kind 'fp' alone (`config.stage_order` and `config.stages` restricted to them).
  The trainer saves the result as `WORKDIR/fp_variables`.

  Args:
    config: the sweep's base config (left unchanged).

  Returns:
    A new config, or None when no full-precision epochs open the run.

  Example:
    >>> from ec2t_jax.configs import mnist
    >>> fp_part(mnist.get_config()).ec2t.num_epochs
    0
  """
  names = _leading_fp(config)
  if not sum(spec.num_epochs for spec in _specs(config) if spec.name in names):
    return None
  out = _copy(config)
  if _explicit(config):
    _keep_stages(out, names)
    return out
  out.ec2t.num_epochs = 0
  out.ec2t.frozen_epochs = 0
  return out


def _check_value(name: str, value: float, *, positive: bool) -> float:
  """`value` as a float, or a ValueError naming it and the valid range."""
  valid = '> 0' if positive else '>= 0'
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise ValueError(f'{name}={value!r} is not a number; valid: a finite number {valid}') from None
  if not math.isfinite(number) or number < 0 or (positive and number == 0):
    raise ValueError(f'{name}={value!r} is out of range; valid: a finite number {valid}')
  return number


def _swept_stages(config: ml_collections.ConfigDict, stages: Sequence[str] | None) -> list[str]:
  """The explicit stages that get γ and s: `stages`, or every stage of kind 'ec2t'."""
  if not _explicit(config):
    if stages:
      raise ValueError(
        f'--stages={",".join(stages)} names stages, but the config has no config.stages (its '
        'run is config.fp, config.ec2t and the frozen epochs); drop --stages'
      )
    return []
  specs = _specs(config)
  candidates = [s.name for s in specs if s.kind in _SWEPT_KINDS]
  if not stages:
    return [s.name for s in specs if s.kind in _DEFAULT_SWEPT]
  unknown = [n for n in stages if n not in candidates]
  if unknown:
    raise ValueError(
      f'--stages names {unknown}, which are not stages of kind {" or ".join(_SWEPT_KINDS)} in '
      f'config.stage_order; valid: {",".join(candidates) or "none"}'
    )
  return list(stages)


def _check_sweepable(config: ml_collections.ConfigDict) -> None:
  """Refuses a run that has no epochs after its full-precision part: γ and s would do nothing."""
  compressing = [s for s in _specs(config) if stages_lib.get(s.kind).compresses]
  if _explicit(config):
    if not any(s.num_epochs for s in compressing):
      raise ValueError(
        f'config.stage_order={",".join(_stage_order(config))!r} has no non-fp stage with epochs, '
        'so γ and s change nothing; add an ec2t stage with num_epochs > 0'
      )
  elif not any(s.num_epochs for s in compressing):
    raise ValueError(
      'config.ec2t.num_epochs and config.ec2t.frozen_epochs are 0, so γ and s change nothing; '
      'set config.ec2t.num_epochs > 0'
    )


def point_config(
  config: ml_collections.ConfigDict,
  gamma: float,
  init_scale: float,
  init_from: str | None = None,
  *,
  stages: Sequence[str] | None = None,
) -> ml_collections.ConfigDict:
  """The config of one grid point: `config` with γ and s set, started from `init_from`.

  γ and s go to `config.ec2t.gamma` and `config.ec2t.init_scale`; with explicit stages
  also to every stage of kind 'ec2t' (or to the stages named by `stages`). With
  `init_from`, the full-precision part (`fp_part`) is removed and the point starts from
  those variables: default form `config.fp.num_epochs = 0`; explicit stages without
  their leading 'fp' stages.

  Args:
    config: the sweep's base config (left unchanged).
    gamma: the entropy gain γ, >= 0.
    init_scale: the initial centroid scale s, > 0.
    init_from: the shared full-precision variables (`DIR/fp/fp_variables`), or None to
      keep the config's own full-precision part and `config.init_from`.
    stages: explicit stages to set γ and s on (kind 'ec2t' or 'ecp'); None: every
      stage of kind 'ec2t'.

  Returns:
    A new, unlocked config.

  Raises:
    ValueError: for a bad γ or s, `stages` without explicit stages or naming other
      stages, or a run with no epochs after its full-precision part.

  Example:
    >>> from ec2t_jax.configs import mnist
    >>> c = point_config(mnist.get_config(), 0.3, 0.5, '/sweep/fp/fp_variables')
    >>> c.ec2t.gamma, c.ec2t.init_scale, c.fp.num_epochs, c.init_from
    (0.3, 0.5, 0, '/sweep/fp/fp_variables')
  """
  from ec2t_jax.training import parse as parse_lib  # Local: the trainer's imports are heavy.

  if 'gamma' not in ec2t_jax.methods.get(parse_lib.method_name(config)).settings:
    raise ValueError(
      f'config.method={config.method!r} has no γ or s to sweep; the sweep varies EC2T '
      "(config.method='ec2t'); train the baseline once with main.py instead"
    )
  gamma = _check_value('gamma', gamma, positive=False)
  init_scale = _check_value('init_scale', init_scale, positive=True)
  targets = _swept_stages(config, stages)
  out = _copy(config)
  if init_from:
    if _explicit(out):
      leading = set(_leading_fp(out))
      _keep_stages(out, [n for n in _stage_order(out) if n not in leading])
    else:
      out.fp.num_epochs = 0
    out.init_from = init_from
  _check_sweepable(out)
  _set(out.ec2t, 'gamma', gamma)
  _set(out.ec2t, 'init_scale', init_scale)
  for name in targets:
    if name in out.stages:
      _set(out.stages[name], 'gamma', gamma)
      _set(out.stages[name], 'init_scale', init_scale)
  return out


def point_name(gamma: float, init_scale: float) -> str:
  """The workdir name of a grid point: `point_name(0.15, 0.3) == 'g0.15_s0.3'`."""
  return f'g{float(gamma):.12g}_s{float(init_scale):.12g}'


def parse_values(text: str | Sequence[str], flag: str) -> list[float]:
  """`'0,0.15,0.3'` (or `['0', '0.15']`) as floats, duplicates dropped; ValueError naming `flag`.

  Example:
    >>> parse_values('0,0.15,0', '--gammas')
    [0.0, 0.15]
  """
  items = text.split(',') if isinstance(text, str) else list(text)
  out = []
  for item in items:
    try:
      value = float(str(item).strip())
    except ValueError:
      raise ValueError(
        f'{flag}: {item!r} is not a number; give comma-separated numbers, e.g. {flag}=0,0.15,0.3'
      ) from None
    if value not in out:
      out.append(value)
  if not out:
    raise ValueError(f'{flag} is empty; give comma-separated numbers, e.g. {flag}=0,0.15,0.3')
  return out


# --- the sweep ---------------------------------------------------------------------------------


def _swept_keys(config: ml_collections.ConfigDict, targets: Sequence[str]) -> set[str]:
  """The flat config keys that the points set (not part of the base config)."""
  keys = {'ec2t.gamma', 'ec2t.init_scale'}
  keys.update(f'stages.{n}.{k}' for n in targets for k in ('gamma', 'init_scale'))
  return keys


def _record(workdir: str, config, stages, grid) -> list[tuple[float, float]]:
  """Checks `DIR/sweep.json` against this sweep, adds the new points; returns every point."""
  from ec2t_jax.training import workdir as workdir_lib

  targets = _swept_stages(config, stages)
  swept = _swept_keys(config, targets)
  base = {k: v for k, v in workdir_lib.flat_config(config).items() if k not in swept}
  mine = {'stages': list(stages) if stages else None, **base}
  path = os.path.join(workdir, SWEEP_FILE)
  points = []
  if os.path.exists(path):
    saved = workdir_lib.read_json_object(
      path, 'the sweep record', fix='restore it, or delete it to record the sweep anew'
    )
    theirs = {'stages': saved.get('stages'), **saved.get('base_config', {})}
    skip = set(workdir_lib.RESUMABLE_FIELDS)
    diff = sorted(
      k for k in set(mine) | set(theirs) if k not in skip and mine.get(k) != theirs.get(k)
    )
    if diff:
      shown = ', '.join(f'{k}: {theirs.get(k)!r} -> {mine.get(k)!r}' for k in diff[:5])
      raise ValueError(
        f'{path!r} records a sweep of another base config ({shown}); rerun with the recorded '
        'settings to continue it, or pass another --workdir for a new sweep'
      )
    points = [(float(g), float(s)) for g, s in saved.get('points', [])]
  points += [p for p in grid if p not in points]
  record = {'base_config': base, 'stages': mine['stages'], 'points': [list(p) for p in points]}
  workdir_lib.write_json(path, record)
  return points


def _summary(path: str) -> dict[str, Any]:
  """A finished run's `summary.json` (a one-line ValueError naming the file if it is damaged)."""
  from ec2t_jax.training import workdir as workdir_lib

  return workdir_lib.read_json_object(
    path, 'the run summary', fix='delete its point directory to train that point again'
  )


def _number(value: Any) -> str:
  return 'n/a' if value is None else f'{value:.4f}'


def _result(summary: dict[str, Any]) -> str:
  return (
    f'test acc {_number(summary.get("test_accuracy"))} sparsity {_number(summary.get("sparsity"))}'
  )


def _train(config, workdir: str) -> dict[str, Any]:
  """`train.train_and_evaluate`, its printed summary table sent to stderr (stdout: progress)."""
  from ec2t_jax.training import train

  with contextlib.redirect_stdout(sys.stderr):
    return train.train_and_evaluate(config, workdir)


def _say(line: str) -> None:
  print(line, flush=True)


def run_sweep(
  config: ml_collections.ConfigDict,
  workdir: str,
  gammas: Sequence[float],
  init_scales: Sequence[float],
  *,
  stages: Sequence[str] | None = None,
  write_report: bool = True,
) -> list[dict[str, Any]] | None:
  """Trains every (γ, s) point of the grid in `workdir` and writes the trade-off report.

  The full-precision part of the run (`fp_part`) trains once in `workdir/fp`; every point
  trains in `workdir/<point_name>` from its variables (`point_config`). Points with a
  `summary.json` are skipped, stopped ones resume. Progress lines go to stdout, the
  trainer's logs and summary tables to stderr.

  Args:
    config: the base config (left unchanged).
    workdir: the sweep's directory (created).
    gammas: the γ values, each >= 0.
    init_scales: the s values, each > 0.
    stages: explicit stages to set γ and s on (see `point_config`).
    write_report: write `workdir/sweep.md` and its plots at the end.

  Returns:
    One dict per point of this grid (`gamma`, `init_scale`, `workdir`, `summary`,
    `trained`: False if it had finished before), or None if SIGTERM or Ctrl-C stopped
    a run (rerun to continue).

  Raises:
    ValueError: for a bad grid or config, a `workdir` that records another base config
      or is in use by another sweep, and everything `train_and_evaluate` refuses.
  """
  from ec2t_jax import report
  from ec2t_jax.training import workdir as workdir_lib

  start = time.time()
  gammas = [_check_value('gamma', g, positive=False) for g in gammas]
  init_scales = [_check_value('init_scale', s, positive=True) for s in init_scales]
  grid = list(dict.fromkeys((g, s) for g in gammas for s in init_scales))
  if not grid:
    raise ValueError('the grid is empty; give at least one gamma and one init_scale')
  if config.get('overwrite'):
    raise ValueError(
      'config.overwrite=True would start points over on every rerun of the sweep; drop it, '
      'and delete a point directory (e.g. DIR/g0.15_s0.3) to train that point again'
    )
  from ec2t_jax.training import parse as parse_lib

  # The base config as the trainer reads it: every problem of it in one error, up front.
  parse_lib.parse(config, check_data=False, check_init_from=False)
  shared = fp_part(config)
  fp_dir = os.path.join(workdir, FP_DIR)
  init_from = os.path.join(os.path.abspath(fp_dir), 'fp_variables') if shared else None
  for gamma, init_scale in grid:  # Every refusal before anything trains.
    point_config(config, gamma, init_scale, init_from, stages=stages)
  workdir_lib.make_directory(workdir)
  with workdir_lib.WorkdirLock(workdir).acquire():
    every_point = _record(workdir, config, stages, grid)
    if shared is not None:
      done = os.path.exists(os.path.join(fp_dir, 'summary.json'))
      if done and os.path.isdir(init_from):
        summary = _summary(os.path.join(fp_dir, 'summary.json'))
        _say(
          f'full precision: finished before in {fp_dir}, reused '
          f'(test acc {_number(summary.get("fp_test_accuracy"))})'
        )
      else:
        _say(f'full precision: training once in {fp_dir} ...')
        tick = time.time()
        summary = _train(shared, fp_dir)
        if summary.get('preempted'):
          _say('stopped during the full-precision part; rerun the same command to continue')
          return None
        _say(
          f'full precision: done in {time.time() - tick:.0f} s '
          f'(test acc {_number(summary.get("fp_test_accuracy"))})'
        )
      if not os.path.isdir(init_from):
        raise ValueError(
          f'the full-precision run in {fp_dir!r} left no {init_from!r}; check its log, or delete '
          f'{fp_dir!r} and rerun'
        )
    results = []
    for i, (gamma, init_scale) in enumerate(grid, 1):
      name = point_name(gamma, init_scale)
      point_dir = os.path.join(workdir, name)
      head = f'point {i}/{len(grid)}: γ={gamma:g} s={init_scale:g}'
      path = os.path.join(point_dir, 'summary.json')
      if os.path.exists(path):
        summary = _summary(path)
        _say(f'{head} finished before ({path}), skipped: {_result(summary)}')
        trained = False
      else:
        _say(f'{head} training in {point_dir} ...')
        tick = time.time()
        summary = _train(
          point_config(config, gamma, init_scale, init_from, stages=stages), point_dir
        )
        if summary.get('preempted'):
          _say(f'{head} stopped at step {summary.get("step")}; rerun the same command to continue')
          return None
        _say(f'{head} done in {time.time() - tick:.0f} s: {_result(summary)}')
        trained = True
      results.append(
        {
          'gamma': gamma,
          'init_scale': init_scale,
          'workdir': point_dir,
          'summary': summary,
          'trained': trained,
        }
      )
    trained = sum(r['trained'] for r in results)
    line = (
      f'sweep: {len(results)} points ({trained} trained, {len(results) - trained} finished '
      f'before) in {time.time() - start:.0f} s'
    )
    if write_report:
      finished = [
        (g, s, os.path.join(workdir, point_name(g, s)))
        for g, s in every_point
        if os.path.exists(os.path.join(workdir, point_name(g, s), 'summary.json'))
      ]
      path = report.write_sweep_report(finished, workdir)
      line += f'; report of {len(finished)} points: {path}'
    _say(line)
    return results


# --- the command line ---------------------------------------------------------------------------


def _define_flags() -> None:
  """Defines `--config` and `--workdir` (as `ec2t_jax.main` does) and the sweep's flags, once."""
  main_lib.import_program()  # --config, --workdir; one line if the [train] extra is missing.
  from absl import flags

  flags.FLAGS['workdir'].help = 'The sweep directory: fp/, one workdir per point, sweep.md.'
  if 'gammas' in flags.FLAGS:
    return
  flags.DEFINE_list('gammas', None, 'Comma-separated entropy gains γ, e.g. 0,0.15,0.3.')
  flags.DEFINE_list('init_scales', None, 'Comma-separated initial centroid scales s, e.g. 0.3,0.5.')
  flags.DEFINE_list(
    'stages',
    None,
    'Explicit stages (config.stages) to set γ and s on; default: every stage of kind ec2t.',
  )
  flags.mark_flags_as_required(['gammas', 'init_scales'])
  for name in ('gammas', 'init_scales', 'stages'):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])


def main(argv: Sequence[str]) -> None:
  """Runs the sweep of the parsed flags (absl's main); bad input exits with one `error:` line."""
  from absl import flags

  def sweep():
    f = flags.FLAGS
    gammas = parse_values(f.gammas, '--gammas')
    init_scales = parse_values(f.init_scales, '--init_scales')
    stages = [s.strip() for s in f.stages or [] if s.strip()] or None
    run_sweep(f.config, f.workdir, gammas, init_scales, stages=stages)

  main_lib.run_command(argv, sweep, interrupted='rerun the same command to continue the sweep')


def run(argv: Sequence[str] | None = None) -> None:
  """The command line (`python -m ec2t_jax.sweep`); `argv` defaults to `sys.argv`."""
  _define_flags()
  from absl import app

  app.run(main, argv=None if argv is None else list(argv), flags_parser=main_lib.parse_flags)


if __name__ == '__main__':
  run()
