"""A run's workdir: its config file, the claim check before training, reading it back.

`load_workdir(path)` reads a finished (or stopped) run without its dataset:
the config, the model, the variables and EC2T state of a checkpoint, the
compression masks and the schedule. The command-line tools (`scoring`,
`export`, `report`) read runs through it; it does not import the trainer.

Example:
  >>> run = load_workdir('workdir/mnist')                      # doctest: +SKIP
  >>> logits = run.model.apply(run.variables, images, train=False)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from ec2t_jax import files, tree_util
from ec2t_jax.configs import default as default_config
from ec2t_jax.training import checkpoint as checkpoint_lib
from ec2t_jax.training import datasets
from ec2t_jax.training import parse as parse_lib
from ec2t_jax.training import schedule as schedule_lib
from ec2t_jax.training import setup as setup_lib
from ec2t_jax.training import spec as spec_lib
from ec2t_jax.training.lock import LOCK_FILE, WorkdirBusyError, WorkdirLock  # noqa: F401  (public here too)

__all__ = [
  'LOCK_FILE',
  'RESUMABLE_FIELDS',
  'RUN_FILES',
  'Workdir',
  'WorkdirBusyError',
  'WorkdirLock',
  'claim_workdir',
  'DATA_FILE',
  'config_from_workdir',
  'flat_config',
  'load_workdir',
  'make_directory',
  'move_run_aside',
  'progress_printer',
  'read_json_object',
  'write_json',
]

# Fields that may differ between the first run and a resume of the same job (and,
# for process_id, between the processes of one multi-process run). Not worker_count:
# grain's iterator position of one worker count does not restore under another.
# skip_nonfinite is: a run stopped by a NaN step resumes with it (the error advises so).
RESUMABLE_FIELDS = (
  'overwrite',
  'log_every_steps',
  'checkpoint_every_steps',
  'steps_per_call',
  'data_dir',
  'skip_nonfinite',
  'process_id',
  'coordinator_address',
  'compilation_cache_dir',
)


class Workdir(NamedTuple):
  """A trained run read back from its workdir (see `load_workdir`).

  Attributes:
    config: the config the run was started with.
    model: its linen module.
    variables: `{'params', 'batch_stats'}` of the checkpoint.
    opt_state: the optimizer state (the EC2T state after the full-precision stage).
    step: the checkpoint's step.
    ternary_mask: bools shaped like the params: the ternary leaves.
    prune_mask: bools of the pruned (ECP) leaves, or None.
    image_shape: one input image, `(height, width, channels)`.
    num_classes: the classifier's outputs.
    schedule: the run's `Schedule` (its stages and their steps).
    normalization: per-channel `(mean, std)` the run's input pipeline applied to
      images scaled to [0, 1], or None for checkpoints of older versions whose
      dataset registers none.
  """

  config: ml_collections.ConfigDict
  model: Any
  variables: dict[str, Any]
  opt_state: Any
  step: int
  ternary_mask: Any
  prune_mask: Any
  image_shape: tuple[int, ...]
  num_classes: int
  schedule: schedule_lib.Schedule
  normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None


def flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """`{'ec2t.gamma': 0.15, ...}`: a config as one flat, JSON-friendly dict."""
  out = {}

  def walk(prefix, node):
    for key, value in node.items():
      name = f'{prefix}{key}'
      if isinstance(value, (ml_collections.ConfigDict, Mapping)):
        walk(name + '.', value)
      else:
        out[name] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)

  walk('', config)
  return out


def write_json(path: str, value: Any) -> None:
  """Writes JSON through a temporary file: never a half-written file, even after SIGKILL.

  A failed write leaves the old file whole, and a symlink at `path` is replaced,
  never written through (`ec2t_jax.files.replacing`).
  """
  files.replace_file(path, json.dumps(value, indent=1, sort_keys=True))


_RESTORE_OR_OVERWRITE = 'restore it, or start over with --config.overwrite=True'


def read_json_object(path: str, what: str, *, fix: str = _RESTORE_OR_OVERWRITE) -> dict[str, Any]:
  """The JSON object in `path`; a ValueError naming the file if it is not one.

  Args:
    path: the file.
    what: how the error names it (e.g. `'the run config'`).
    fix: what the error advises (a program that refuses `overwrite` passes its own).

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: if it is not UTF-8 JSON holding an object.
  """
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise ValueError(
      f'{what} {path!r} is not valid JSON ({" ".join(str(e).split())[:120]}); {fix}'
    ) from e
  if not isinstance(value, dict):
    raise ValueError(f'{what} {path!r} holds a JSON {type(value).__name__}, not an object; {fix}')
  return value


# --- claiming a workdir ----------------------------------------------------------------------

# What a run writes into its workdir: `overwrite=True` moves all of it aside.
RUN_FILES = (
  'config.json',
  'config.json.tmp',
  'data.json',
  'summary.json',
  'summary.json.tmp',
  'metrics.jsonl',
  'checkpoints',
  'best',
  'fp_variables',
  'tensorboard',
)
_RUN_DIRS = ('checkpoints', 'best', 'fp_variables', 'tensorboard')


def _check_run_files(workdir: str) -> None:
  """Refuses a workdir whose run files have the wrong type (e.g. `checkpoints` a file)."""
  for name in RUN_FILES:
    path = os.path.join(workdir, name)
    if not os.path.lexists(path):
      continue
    want_dir = name in _RUN_DIRS
    if os.path.isdir(path) != want_dir:
      raise ValueError(
        f'workdir {workdir!r}: {path!r} must be a {"directory" if want_dir else "file"} but is '
        f'{"a directory" if os.path.isdir(path) else "not one"}; move it away, or pass another '
        '--workdir'
      )


def move_run_aside(workdir: str) -> str | None:
  """Moves the run files of `workdir` (`RUN_FILES`) into `workdir/overwritten-<time>/`.

  Returns:
    The new directory, or None if the workdir held no run file.
  """
  present = [n for n in RUN_FILES if os.path.lexists(os.path.join(workdir, n))]
  if not present:
    return None
  stamp = time.strftime('%Y%m%d-%H%M%S')
  target = os.path.join(workdir, f'overwritten-{stamp}')
  suffix = 1
  while os.path.lexists(target):
    suffix += 1
    target = os.path.join(workdir, f'overwritten-{stamp}-{suffix}')
  os.makedirs(target)
  for name in present:
    os.replace(os.path.join(workdir, name), os.path.join(target, name))
  return target


def _check_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir holding a run of another config (or checkpoints of an unknown one)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    leftovers = [
      n
      for n in ('checkpoints', 'best', 'summary.json')
      if os.path.isdir(os.path.join(workdir, n))
      and os.listdir(os.path.join(workdir, n))
      or os.path.isfile(os.path.join(workdir, n))
    ]
    if leftovers:
      raise ValueError(
        f'workdir {workdir!r} holds {", ".join(leftovers)} but no config.json, so the settings '
        'that wrote them are unknown; restore config.json, or start over with '
        '--config.overwrite=True (the old files are moved aside)'
      )
    return
  mine = {k: v for k, v in flat_config(config).items() if k not in RESUMABLE_FIELDS}
  theirs = {
    k: v for k, v in read_json_object(path, 'the run config').items() if k not in RESUMABLE_FIELDS
  }
  # A field added to the defaults after the run was written is the same when left at its default.
  defaults = flat_config(default_config.get_config())
  diff = sorted(
    k
    for k in set(mine) | set(theirs)
    if mine.get(k) != theirs.get(k) and not (k not in theirs and mine[k] == defaults.get(k, ...))
  )
  if diff:
    shown = ', '.join(f'{k}: {theirs.get(k)!r} -> {mine.get(k)!r}' for k in diff[:5])
    raise ValueError(
      f'workdir {workdir!r} holds a run of a different config ({shown}); use another '
      '--workdir, or --config.overwrite=True to start over there (the old run is moved aside)'
    )


# The fingerprint of the data a workdir's run trains on (`datasets.fingerprint`).
DATA_FILE = 'data.json'


def _data_record(run: spec_lib.RunSpec) -> dict[str, Any] | None:
  source = run.data.source
  return None if source is None else datasets.fingerprint(source)


def _check_data(run: spec_lib.RunSpec, workdir: str) -> None:
  """Refuses to resume a run on data other than the data it was trained on."""
  path = os.path.join(workdir, DATA_FILE)
  mine = _data_record(run)
  if mine is None or not os.path.exists(path):
    return  # A new run, or one of an older version that recorded nothing.
  theirs = read_json_object(path, 'the data record')
  diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
  if diff:
    shown = ', '.join(f'{k}: {theirs.get(k)!r} -> {mine.get(k)!r}' for k in diff[:3])
    raise ValueError(
      f'workdir {workdir!r} holds a run trained on other data than {run.data.name!r} is now '
      f'({shown}); restore the data it was trained on, use another --workdir, or '
      '--config.overwrite=True to start over there (the old run is moved aside)'
    )


def make_directory(workdir: str) -> None:
  """Creates `workdir` (and its parents) if needed.

  Raises:
    ValueError: one line, for a path that is a file or cannot be created.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f'workdir {workdir!r} is not a directory; pass a --workdir directory')
  if os.path.islink(workdir) and not os.path.exists(workdir):
    raise ValueError(
      f'workdir {workdir!r} is a symlink to {os.readlink(workdir)!r}, which does not exist; '
      'create that directory, or pass another --workdir'
    )
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f'workdir {workdir!r} cannot be created: {e.strerror}') from e


def claim_workdir(run: spec_lib.RunSpec, workdir: str) -> WorkdirLock | None:
  """Locks the workdir, checks it can hold this run, and claims it (writes `config.json`).

  1. The workdir must be creatable and writable.
  2. Process 0 takes the `WorkdirLock` (a live run elsewhere is refused at
     once; the processes of one multi-process run share process 0's lock).
  3. Run files must have their types (`checkpoints` a directory, ...).
  4. Without `config.overwrite`, a `config.json` must match `config` in every
     field but `RESUMABLE_FIELDS`, a `data.json` the fingerprint of the run's
     data (`datasets.fingerprint`), and checkpoints without a `config.json` are
     refused. With `config.overwrite`, the old run's files (`RUN_FILES`:
     checkpoints, `best/`, `fp_variables/`, metrics, TensorBoard files,
     `summary.json`, `config.json`) are moved to `workdir/overwritten-<time>/`
     and the run starts over.
  5. `config.json` and `data.json` are written (only if they change).

  Args:
    run: the parsed run (`ec2t_jax.training.parse.parse`); its config is what
      `config.json` holds.
    workdir: its directory.

  Returns:
    The held `WorkdirLock` (process 0), to `release()` when the run ends; None
    on the other processes.

  Raises:
    ValueError: for a workdir that cannot be created or written, is held by a
      live run (`WorkdirBusyError`), has run files of the wrong type, or holds a
      run of a different config (unless `config.overwrite`).
  """
  make_directory(workdir)
  if not os.path.isdir(workdir):
    raise ValueError(f'workdir {workdir!r} is not a directory; pass a --workdir directory')
  if not os.access(workdir, os.W_OK):
    raise ValueError(f'workdir {workdir!r} is not writable; pass a --workdir you can write to')
  overwrite, config = run.checkpoints.overwrite, run.config
  lock, error = None, None
  try:
    if jax.process_index() == 0:
      lock = WorkdirLock(
        workdir,
        process_count=jax.process_count(),
        coordinator=run.runtime.coordinator_address,
      ).acquire()
    _check_run_files(workdir)
    if not overwrite:
      _check_config(config, workdir)
      _check_data(run, workdir)
  except (ValueError, OSError) as e:
    error = e
  if jax.process_count() > 1:
    # Every process has read the workdir as it was; only now may process 0 change it.
    # (A process that read process 0's fresh config.json could decide differently.)
    failed = multihost_utils.process_allgather(np.int32(error is not None))
    if error is None and np.any(failed):
      error = ValueError(f'another process of this run could not claim {workdir!r} (see its log)')
  if error is not None:
    if lock is not None:
      lock.release()
    raise error
  try:
    if jax.process_index() == 0:
      if overwrite:
        moved = move_run_aside(workdir)
        if moved:
          logging.warning(
            'config.overwrite=True: the previous run in %r is moved to %r; starting over '
            '(drop --config.overwrite for restarts of this run, or each restart starts over)',
            workdir,
            moved,
          )
      path = os.path.join(workdir, 'config.json')
      mine = flat_config(config)
      if not os.path.exists(path) or read_json_object(path, 'the run config') != mine:
        write_json(path, mine)
      data = _data_record(run)
      data_path = os.path.join(workdir, DATA_FILE)
      if data is not None and (
        not os.path.exists(data_path) or read_json_object(data_path, 'the data record') != data
      ):
        write_json(data_path, data)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('ec2t_jax:workdir_claimed')
  except BaseException:
    if lock is not None:
      lock.release()
    raise
  return lock


def config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was started with (`workdir/config.json`).

  Raises:
    FileNotFoundError: if the workdir has no config.json.
    ValueError: if config.json is not a JSON object.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir!r} holds no config.json: is it a workdir of main.py?')
  flat = read_json_object(path, 'the run config')
  nested: dict[str, Any] = {}
  for key, value in flat.items():
    node = nested
    *parents, leaf = key.split('.')
    for p in parents:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ValueError(f'the run config {path!r} has both {p!r} and {key!r}; restore it')
    node[leaf] = value
  nested.setdefault('model_kwargs', {})
  return ml_collections.ConfigDict(nested)


def _data_facts(extra: Mapping[str, Any], workdir: str):
  """`(steps_per_epoch, num_classes, image_shape, normalization)` from a checkpoint's extra data.

  Raises:
    ValueError: for a checkpoint that does not record them (written before
      checkpoints did).
  """
  missing = sorted({'steps_per_epoch', 'num_classes', 'image_shape'} - set(extra))
  if missing:
    raise ValueError(
      f'a checkpoint of {workdir!r} does not record {", ".join(missing)} (written by an '
      'early version of ec2t_jax); rerun the training command with this version'
    )
  normalization = None
  if extra.get('normalization') is not None:
    mean, std = extra['normalization']
    normalization = tuple(map(float, mean)), tuple(map(float, std))
  return (
    int(extra['steps_per_epoch']),
    int(extra['num_classes']),
    tuple(extra['image_shape']),
    normalization,
  )


def _newest_extra(ckpt: checkpoint_lib.Checkpointer, workdir: str) -> dict[str, Any]:
  """The JSON item of the newest periodic checkpoint that reads back (the run's facts)."""
  for step in ckpt.steps()[::-1]:
    try:
      return ckpt.read_extra(step)
    except Exception:  # noqa: BLE001, S112 - an older one will do.
      continue
  raise FileNotFoundError(f'{workdir!r} has no periodic checkpoint that reads back')


def recorded_data_facts(workdir: str):
  """`(steps_per_epoch, num_classes, image_shape, normalization)` a run's checkpoints record.

  Read from the newest checkpoint's JSON item (no arrays are read).

  Raises:
    FileNotFoundError: for a workdir with no checkpoint that reads back.
    ValueError: for a checkpoint that does not record them.
  """
  config_from_workdir(workdir)  # A workdir of a run: refused without its config.json.
  ckpt = checkpoint_lib.Checkpointer(workdir)  # Reads only: its max_to_keep does not matter.
  try:
    return _data_facts(_newest_extra(ckpt, workdir), workdir)
  finally:
    ckpt.close()


def _check_model(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises one ValueError if the run's `config.model` cannot be built in this process.

  A model of your own (`'package.module:factory'`, or a name your code
  registered) must be importable here as it was in training. That is a property
  of this process, not of a checkpoint, so `load_workdir` checks it once, before
  it reads any checkpoint, instead of reporting it as one failure per checkpoint.
  """
  from ec2t_jax import models

  name = parse_lib.model_spec(config).name if config.get('model') else None
  if not isinstance(name, str) or not name:
    raise ValueError(
      f'the run config of {workdir!r} names no model (model: {name!r}); restore its config.json'
    )
  try:
    models.check_name(name)
  except ValueError as e:
    # A 'package.module:factory' error already says "is it on PYTHONPATH?".
    hint = (
      ''
      if ':' in name
      else '; import the module that registers it (ec2t_jax.models.register) before loading'
    )
    raise ValueError(f'cannot read {workdir!r}: {" ".join(str(e).split())}{hint}') from None


def progress_printer(tool: str) -> Callable[[str], None] | None:
  """`message -> None` printing ``'<tool>: <message>'`` to stderr, or None if that is no terminal.

  The command-line tools (`scoring`, `export`, `report`) say what they are doing
  while it takes seconds; on a terminal only, so that logs, pipes and captured
  output hold their results and errors alone.
  """
  if not (hasattr(sys.stderr, 'isatty') and sys.stderr.isatty()):
    return None
  return lambda message: print(f'{tool}: {message}', file=sys.stderr, flush=True)


def _use_compilation_cache(path: str) -> None:
  """Points JAX's persistent compilation cache at the run's `config.compilation_cache_dir`.

  Building the run's setup compiles the model's initialization (seconds on CPU;
  the checkpoint replaces its values), which the training run stored in that
  cache: read from there, it costs milliseconds. A cache the user chose already
  (`$JAX_COMPILATION_CACHE_DIR`, `jax.config.update`) is left as it is, as
  `ec2t_jax.training.train.enable_compilation_cache` leaves it.
  """
  if path and isinstance(path, str) and not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(path))


def load_workdir(
  workdir: str,
  *,
  best: bool = False,
  progress: Callable[[str], None] | None = None,
  compilation_cache: bool = False,
) -> Workdir:
  """Reads the newest (or the best-by-validation) checkpoint of a run, without its dataset.

  Args:
    workdir: a directory written by `ec2t_jax.training.train.train_and_evaluate`.
    best: read the best-by-validation checkpoint instead of the newest.
    progress: called with a line saying which checkpoint it reads, before it
      reads it (e.g. `progress_printer`); None says nothing.
    compilation_cache: use the run's persistent compilation cache
      (`config.compilation_cache_dir`, unless one is set already) for the
      compilations of building its setup. The command-line tools pass True:
      with the cache the training run filled, they start in a second instead
      of compiling the model's initialization again.

  Returns:
    A `Workdir` with the config, the linen module, `{'params', 'batch_stats'}`,
    the optimizer state, the step, the compression masks and the schedule.

  The newest checkpoint that reads back intact is used: while a run is
  writing or rotating its checkpoints, or after a crash cut one short, an
  older one is read instead (with a warning naming both steps; `Workdir.step`
  says which). The best-by-validation slot has no fallback.

  Raises:
    FileNotFoundError: for a directory without config.json or without the
      requested checkpoint.
    ValueError: for a config.json that is not a JSON object, a model that
      cannot be built in this process (one error, before any checkpoint is
      tried), or when no checkpoint reads back.
  """
  config = config_from_workdir(workdir)
  _check_model(config, workdir)  # Once: no checkpoint can fix a model that does not build.
  # The run as it was configured; its data and devices are not needed to read it back.
  run = parse_lib.parse(config, check_data=False, check_init_from=False, check_devices=False)
  if compilation_cache:
    _use_compilation_cache(run.runtime.compilation_cache_dir)
  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=run.checkpoints.max_to_keep)
  try:
    if best:
      step = ckpt.best_step()
      if step is None:
        raise FileNotFoundError(f'{workdir!r} has no best-by-validation checkpoint')
      candidates = [step]
    else:
      candidates = ckpt.steps()[::-1]
      if not candidates:
        raise FileNotFoundError(f'{workdir!r} has no checkpoint')
    failures = []
    for step in candidates:
      if progress is not None:
        progress(f'reading {"the best checkpoint" if best else "checkpoint"} {step} of {workdir}')
      try:
        extra = ckpt.read_extra(step) if not best else _newest_extra(ckpt, workdir)
        steps_per_epoch, num_classes, image_shape, normalization = _data_facts(extra, workdir)
        schedule = schedule_lib.create_schedule(run.stages, steps_per_epoch)
        setup = setup_lib.create_setup(
          run, schedule, num_classes=num_classes, image_shape=image_shape, load_pretrained=False
        )
        # A best checkpoint holds the state of the stage that ran its step (it is saved
        # before a stage boundary's switch); a periodic one, the state of the stage after.
        index = schedule.stage_at(step - 1).pass_index if best else schedule.pass_at(step)
        target = setup_lib.state_tree(setup_lib.abstract_train_state_of(setup, index))
        tree, _ = ckpt.restore(step, target, best=best)
        break
      except Exception as e:  # noqa: BLE001 - any read failure means "try an older one".
        first_line = str(e).splitlines()[0][:200] if str(e) else ''
        failures.append(f'{step} ({type(e).__name__}: {first_line})')
        if best or len(failures) == len(candidates):
          raise ValueError(
            f'no checkpoint of {workdir!r} reads back: ' + '; '.join(failures)
          ) from e
    if failures:
      logging.warning(
        'checkpoint %s of %r cannot be read; using checkpoint %d instead',
        failures[0],
        workdir,
        step,
      )
  finally:
    ckpt.close()
  params = tree['params']
  pattern, fraction = run.output.magnitude_prune_pattern, run.output.magnitude_prune_fraction
  if pattern and fraction:
    params, names = tree_util.magnitude_prune(params, pattern, fraction)
    logging.info(
      'magnitude-pruned %d kernels of %s at %g x their max |w| (config.magnitude_prune)',
      len(names),
      workdir,
      fraction,
    )
  return Workdir(
    config=config,
    model=setup.model,
    variables={'params': params, 'batch_stats': tree['batch_stats']},
    opt_state=tree['opt_state'],
    step=int(step),
    ternary_mask=setup.ternary_mask,
    prune_mask=setup.prune_mask,
    image_shape=setup.image_shape,
    num_classes=num_classes,
    schedule=schedule,
    normalization=normalization,
  )
