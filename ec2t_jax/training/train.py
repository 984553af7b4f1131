"""The EC2T training program: full precision → EC2T → frozen assignment, resumable.

`train_and_evaluate(config, workdir)` runs one configured job end to end:

1. optional full-precision training (`config.fp.num_epochs`, e.g. a
   compound-scaled super-network from scratch), or weights from
   `config.init_from` (an orbax directory written by
   `ec2t_jax.training.checkpoint.save_variables`, or a PyTorch `.pt`/`.pth`);
2. the EC2T stage (`config.ec2t.num_epochs`), ternarizing with `ec2t_jax.ec2t`;
3. the frozen-assignment stage (`config.ec2t.frozen_epochs`).

The stages and their steps are one value, the run's `Schedule`
(`ec2t_jax.training.schedule`); one global step counter spans them, and every
stage boundary is an ordinary, checkpointed step, so an interrupted run
resumes exactly where it stopped. Data parallelism uses a `jax.sharding.Mesh`
over every device: batches are sharded on their leading axis, params and EC2T
state are replicated, and BatchNorm statistics are computed over the global
batch. The shape of this file follows flax's `examples/imagenet/train.py`:
small functions (`open_data`, `create_input_iter`, `train_step`, `eval_step`,
`evaluate`) and one loop in `train_and_evaluate`.
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

import ec2t_jax
from ec2t_jax import tree_util
from ec2t_jax.training import checkpoint as checkpoint_lib
from ec2t_jax.training import metric_writers
from ec2t_jax.training import parse as parse_lib
from ec2t_jax.training import schedule as schedule_lib
from ec2t_jax.training import setup as setup_lib
from ec2t_jax.training import teacher as teacher_lib
from ec2t_jax.training import workdir as workdir_lib
from ec2t_jax.training.batches import create_input_iter, eval_batches, open_data
from ec2t_jax.training.runtime import (
  Preemption,
  check_backend,
  create_mesh,
  enable_compilation_cache,
  initialize_distributed,
  to_global,
)
from ec2t_jax.training.stages import BEST
from ec2t_jax.training.steps import (
  default_unroll,
  eval_step,
  evaluate,
  scan_steps,
  step_rng,
  train_step,
)
from ec2t_jax.training.summary import print_summary, saved_summary, summarize_run


class NonFiniteError(FloatingPointError):
  """The loss or a gradient became NaN or inf."""


# --- configuration ---------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict, *, check_init_from: bool = True) -> None:
  """Refuses bad settings before anything is computed or written (no data is opened).

  `ec2t_jax.training.spec.parse` without its data checks: every problem is
  reported at once.

  Args:
    config: the run's config.
    check_init_from: also refuse a recipe that needs `config.init_from` and has
      none.

  Raises:
    ValueError: naming each bad value and what would be valid.
  """
  parse_lib.parse(config, check_data=False, check_init_from=check_init_from)


# --- data ------------------------------------------------------------------------------------


# --- steps -----------------------------------------------------------------------------------


# --- the loop's helpers ----------------------------------------------------------------------


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def _stage_title(stage: schedule_lib.Stage) -> str:
  """'EC2T' for the default sequence's stages, 'ternarize (EC2T)' for named ones."""
  title = stage.kind_info.title
  return title if stage.label == stage.kind else f'{stage.label} ({title})'


class TrainMetrics:
  """Keeps the training steps' metrics on device and writes their means now and then.

  Reading metrics back from the device every step would stall the pipeline,
  so `add` only queues them; `flush(step, state)` reads the queue at once,
  stops the run on a NaN/inf step (unless `skip_nonfinite`), and writes the
  means, the EC2T statistics of `state` and a progress line with an ETA.
  """

  def __init__(self, run, setup, writer, statistics_fn, step: int):
    self._skip_nonfinite = run.runtime.skip_nonfinite
    self._setup = setup
    self._schedule = setup.schedule
    self._writer = writer
    self._statistics = statistics_fn
    self._pending: list[tuple[int, dict[str, jax.Array]]] = []
    self._last = (time.time(), step)
    self._trained = self._skipped = 0  # Steps this process took, and those skipped.

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    """Queues the metrics of the step(s) that ended at `step`.

    `metrics` are one step's scalars, or k steps' stacked on a leading axis (the
    steps `step - k + 1 ... step` of one `scan_steps` call).
    """
    self._pending.append((step, metrics))

  def _host_metrics(self) -> list[tuple[int, dict[str, float]]]:
    """The queued metrics read back, one `(step, scalars)` per step."""
    out = []
    for (step, _), m in zip(
      self._pending, jax.device_get([m for _, m in self._pending]), strict=True
    ):
      k = np.size(m['loss'])
      flat = {name: np.reshape(v, (k,)) for name, v in m.items()}
      out += [(step - k + 1 + i, {name: v[i] for name, v in flat.items()}) for i in range(k)]
    return out

  def flush(self, step: int, state: setup_lib.TrainState) -> None:
    """Writes the queued metrics (no-op if none); raises `NonFiniteError` on a bad step."""
    if not self._pending:
      return
    per_step = self._host_metrics()
    host = [m for _, m in per_step]
    bad = [s for s, m in per_step if m['nonfinite'] > 0]
    if bad and not self._skip_nonfinite:
      raise NonFiniteError(
        f'the loss or a gradient became NaN/inf at step {bad[0]}; the run stopped and the last '
        'good checkpoint is kept. Rerun with --config.skip_nonfinite=True to skip such steps '
        '(it resumes from that checkpoint), or start over with a lower learning rate '
        '(--config.overwrite=True, or another --workdir).'
      )
    self._trained += len(host)
    self._skipped += len(bad)
    if step == self._schedule.total_steps and self._skipped == self._trained:
      raise NonFiniteError(  # Before the final checkpoint: no rerun reports this network.
        f'every one of the {self._trained} steps this run took was skipped (NaN/inf loss or '
        'gradient, config.skip_nonfinite=True): the network did not train, so no summary is '
        'written. Check the data and the model, or lower the learning rate'
      )
    now, total = time.time(), self._schedule.total_steps
    rate = (step - self._last[1]) / max(now - self._last[0], 1e-9)
    stage = self._schedule.stage_at(step - 1)
    scalars = {
      'train/loss': np.mean([m['loss'] for m in host]),
      'train/accuracy': np.mean([m['accuracy'] for m in host]),
      'train/skipped_nonfinite': float(sum(m['nonfinite'] for m in host)),
      'progress/steps_per_second': rate,
      'progress/fraction': step / max(total, 1),
    }
    if not stage.kind_info.compresses:
      p = self._setup.passes[stage.pass_index]
      lr = setup_lib.learning_rate_schedule(p.settings, p.num_steps)
      scalars['train/learning_rate'] = float(lr(step - self._schedule.pass_start(stage.pass_index)))
    else:
      stats = jax.device_get(self._statistics(state.opt_state, state.params))
      scalars.update({f'ec2t/{k}': float(v) for k, v in stats.items()})
    self._writer.write_scalars(step, scalars)
    logging.info(
      '%s stage, step %d/%d (%.1f%%), %.1f steps/s, ETA %s',
      _stage_title(stage),
      step,
      total,
      100.0 * step / max(total, 1),
      rate,
      _format_eta((total - step) / max(rate, 1e-9)),
    )
    self._pending = []
    self._last = (now, step)


class _StepPrograms:
  """The compiled training step (one per call, and k per call), without and with a teacher."""

  def __init__(self, run, replicated):
    self._skip_nonfinite = run.runtime.skip_nonfinite
    self._replicated = replicated
    self._programs: dict[Any, tuple[Any, Any]] = {}

  def get(self, teacher: teacher_lib.Teacher | None) -> tuple[Any, Any]:
    """`(one step, k steps)` jitted, state donated; for `teacher`'s forward pass if not None."""
    key = None if teacher is None else id(teacher.model)
    if key not in self._programs:
      one = functools.partial(train_step, skip_nonfinite=self._skip_nonfinite)
      if teacher is not None:
        one = functools.partial(one, teacher_apply=teacher.model.apply)
      out = self._replicated
      self._programs[key] = (
        jax.jit(one, donate_argnums=(0,), out_shardings=(out, out)),
        jax.jit(
          functools.partial(scan_steps, one, unroll=default_unroll()),
          donate_argnums=(0,),
          out_shardings=out,
        ),
      )
    return self._programs[key]


def _crossed(before: int, after: int, every: int) -> bool:
  """True if a multiple of `every` lies in `(before, after]` (the steps of the last call)."""
  return after // every > before // every


def _checkpoint_extra(step, schedule, data, train_iter, meta) -> dict[str, Any]:
  """What a checkpoint stores besides the arrays: the data position, metadata, the schedule."""
  return {
    'data_iterator': base64.b64encode(train_iter.get_state()).decode('ascii'),
    'meta': meta,
    'phase': schedule.stage_at(step).label,
    'steps_per_epoch': schedule.steps_per_epoch,
    'schedule': schedule.to_dict(),
    'num_classes': data.num_classes,
    'image_shape': list(data.image_shape),
    'normalization': [[float(v) for v in part] for part in data.normalization],
  }


def _evaluate_fp(evaluate_split, state, writer, step: int) -> dict[str, float]:
  """Validation and test accuracy of the full-precision network (before EC2T)."""
  val, test = evaluate_split(state, 'val'), evaluate_split(state, 'test')
  out = {'fp_test_accuracy': test.get('accuracy', float('nan'))}
  if val:
    out['fp_val_accuracy'] = val['accuracy']
  writer.write_scalars(step, {f'fp/{k}': v for k, v in out.items()})
  return out


def _plain_state(setup: setup_lib.Setup) -> setup_lib.TrainState:
  """A state of the starting variables with no optimizer (to evaluate them)."""
  return setup_lib.TrainState.create(
    apply_fn=setup.model.apply,
    params=setup.variables['params'],
    tx=optax.identity(),
    batch_stats=setup.variables['batch_stats'],
  )


def _enter_stage(stage, state, setup, new_state, ckpt, sharding) -> setup_lib.TrainState:
  """The state `stage` starts from at its first step.

  A new pass starts fresh optimizer state from the last step's variables, or
  from the best-by-validation checkpoint's (`start_from='best'`). A frozen
  stage that starts from the best checkpoint takes that checkpoint's whole
  state (weights, BatchNorm statistics, assignment, centroids) and sets the
  pass's update counters to where the assignment freezes.
  """
  schedule = setup.schedule
  current = schedule.stage_at(stage.start - 1).pass_index
  if stage.start_from != BEST:
    if stage.pass_index == current:
      return state
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    return new_state[stage.pass_index](variables)
  best = ckpt.best_step()
  # A resume cannot change start_from (the config check), so the advice is what it can do.
  best_dir = os.path.join(ckpt.workdir, 'best')
  advice = (
    f'restore {best_dir!r} from a backup, or start over with --config.overwrite=True (the old '
    'run is moved aside)'
  )
  if best is None:
    raise ValueError(
      f"stage {stage.label!r} starts from the best checkpoint (start_from='best') but "
      f'{best_dir!r} holds none (deleted?); {advice}'
    )
  # A best checkpoint holds the state of the stage that ran its step.
  best_pass = schedule.stage_at(best - 1).pass_index
  target = setup_lib.state_tree(setup_lib.abstract_train_state_of(setup, best_pass))
  try:
    tree, _ = ckpt.restore(best, target, best=True)
  except ValueError as e:
    raise ValueError(
      f'stage {stage.label!r} starts from the best checkpoint, but {e}; {advice}'
    ) from e
  tree = jax.device_put(tree, sharding)
  logging.info('%s stage starts from the best checkpoint (step %d).', stage.label, best)
  if stage.pass_index == best_pass:
    freeze = schedule.freeze_step(stage.pass_index)
    return state.replace(
      params=tree['params'],
      batch_stats=tree['batch_stats'],
      opt_state=ec2t_jax.state_utils.with_update_count(tree['opt_state'], freeze),
    )
  return new_state[stage.pass_index]({'params': tree['params'], 'batch_stats': tree['batch_stats']})


# --- the run ---------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the configured job in `workdir` (resuming if it holds checkpoints).

  The workdir is locked for the run (`workdir_lib.WorkdirLock`: a second run
  on it is refused at once); SIGTERM or Ctrl-C save a checkpoint and return;
  rerunning a finished run changes nothing on disk and returns its saved
  summary. `config.overwrite=True` moves an earlier run aside and starts over.

  Args:
    config: a config from `configs/` (see `configs/default.py` for every field).
    workdir: where checkpoints, metrics, TensorBoard files and `summary.json` go.

  Returns:
    The summary dict also written to `workdir/summary.json`, or
    `{'preempted': True, 'step': step}` after SIGTERM or Ctrl-C.

  Raises:
    ValueError: for a bad config, an unusable workdir or backend (one line each).
    OSError: when a checkpoint cannot be written.
    NonFiniteError: when the loss or a gradient becomes NaN/inf.
  """
  start_time = time.time()
  # Multi-host JAX starts before anything counts devices (parse does).
  initialize_distributed(parse_lib.runtime_spec(config))
  logging.info(
    'JAX devices: %s (process %d of %d)', check_backend(), jax.process_index(), jax.process_count()
  )
  # Every setting, the data's classes and shapes and the model's outputs are checked here,
  # before the workdir is touched: all problems in one error.
  run = parse_lib.parse(config)
  logging.info(
    'persistent compilation cache: %s',
    enable_compilation_cache(run.runtime.compilation_cache_dir) or 'off',
  )
  mesh = create_mesh(run.runtime.num_devices)
  data = open_data(run)
  schedule = schedule_lib.create_schedule(run.stages, data.steps_per_epoch)
  setup = setup_lib.create_setup(
    run, schedule, num_classes=data.num_classes, image_shape=data.image_shape
  )
  lock = workdir_lib.claim_workdir(run, workdir)
  try:
    with Preemption() as preemption:
      return _train(run, workdir, mesh, data, setup, preemption, start_time)
  finally:
    if lock is not None:
      lock.release()


def _train(run, workdir, mesh, data, setup, preemption, start_time) -> dict[str, Any]:
  """The run in a claimed workdir: resume or start, the loop, the final summary."""
  schedule = setup.schedule
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  # Only the run that holds the workdir may remove the leftovers of interrupted saves.
  ckpt = checkpoint_lib.Checkpointer(
    workdir, max_to_keep=run.checkpoints.max_to_keep, cleanup_tmp=True
  )
  writer = None
  try:
    # Resume from the newest checkpoint, or start at step 0.
    step, tree, extra = ckpt.restore_latest(
      lambda s: setup_lib.state_tree(setup_lib.abstract_train_state(setup, s))
    )
    on_disk = ckpt.steps() if step is None else []
    if on_disk:
      # Starting over would overwrite them: refuse instead of losing a run silently.
      raise ValueError(
        f'workdir {workdir!r} holds checkpoints (steps {on_disk}) but none can be restored '
        'into this train state (written by a different model, or by an older ec2t_jax whose '
        'EC2T state stored layers one by one; see the warnings above); use another '
        '--workdir, or --config.overwrite=True to start over there (the old run is moved aside)'
      )
    if step is not None and step >= schedule.total_steps:
      saved = saved_summary(workdir, tree['params'])
      if saved is not None:  # A finished run: change nothing on disk, show what it saved.
        logging.info('%s holds a finished run (step %d); its saved summary:', workdir, step)
        print_summary(saved)
        return saved

    distillation = teacher_lib.Distillation(run, setup, workdir, replicated)
    compiled = _StepPrograms(run, replicated)
    per_call = run.runtime.steps_per_call
    stacked_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, 'data'))
    p_eval_step = jax.jit(eval_step, out_shardings=replicated)
    p_statistics = jax.jit(ec2t_jax.statistics)
    new_state = {  # One compiled program per pass instead of many eager ops.
      index: jax.jit(
        functools.partial(setup_lib.create_train_state, setup, index), out_shardings=replicated
      )
      for index in range(schedule.num_passes)
    }

    def evaluate_split(state, split):
      return evaluate(p_eval_step, state, eval_batches(run, data, split), data_sharding)

    writer = metric_writers.MetricWriter(
      workdir,
      write_files=jax.process_index() == 0,
      console_keys=('train/', 'val/', 'test/', 'fp/', 'ec2t/total', 'ec2t/entropy', 'progress/'),
    )
    writer.write_hparams(workdir_lib.flat_config(run.config))
    train_iter = create_input_iter(run, data)
    meta: dict[str, Any] = {}
    if step is None:
      step = 0
      first = schedule.stage_at(0)
      if first.kind_info.compresses:  # Compression starts at once: record where it starts.
        meta.update(_evaluate_fp(evaluate_split, _plain_state(setup), writer, 0))
      state = new_state[first.pass_index](setup.variables)
    else:
      logging.info(
        'Resuming %s from step %d (%s stage).', workdir, step, schedule.stage_at(step).label
      )
      restored = setup_lib.with_state_tree(new_state[schedule.pass_at(step)](setup.variables), tree)
      state = jax.device_put(restored, replicated)
      train_iter.set_state(base64.b64decode(extra['data_iterator']))
      meta = dict(extra.get('meta', {}))
    distillation.start(step, meta, data.normalization)

    base_rng = jax.random.key(run.runtime.seed + 1)
    log = TrainMetrics(run, setup, writer, p_statistics, step)
    # The best validation accuracy of the current pass (each pass keeps its own best).
    pass_index = schedule.pass_at(step)
    best_val = float(meta.get('best_val_accuracy', -1.0))
    if meta.get('best_pass', pass_index) != pass_index:
      best_val = -1.0
    if preemption.requested:  # During the set-up: no step since the last checkpoint.
      logging.warning(
        'Stopped at step %d (%s); rerun the same command to resume.', step, preemption.signal_name
      )
      return {'preempted': True, 'step': step}
    while step < schedule.total_steps:
      # k steps per call where k steps fit before the epoch ends (stages and evaluations
      # fall on epoch ends), else one: every event below happens between calls.
      k = per_call if step % schedule.steps_per_epoch + per_call <= schedule.steps_per_epoch else 1
      before = step
      teacher_args = distillation.step_args(schedule.stage_at(step))
      p_one, p_many = compiled.get(distillation.teacher if teacher_args else None)
      extra_args = () if teacher_args is None else (teacher_args,)
      if k == 1:
        batch = to_global(next(train_iter), data_sharding)
        state, metrics = p_one(state, batch, step_rng(base_rng, step), *extra_args)
      else:
        batches = [next(train_iter) for _ in range(k)]
        stacked = {key: np.stack([b[key] for b in batches]) for key in batches[0]}
        state, metrics = p_many(
          state, to_global(stacked, stacked_sharding), base_rng, np.uint32(step), *extra_args
        )
      step += k
      log.add(step, metrics)
      end_of_epoch = step % schedule.steps_per_epoch == 0
      if (
        _crossed(before, step, run.checkpoints.log_every_steps)
        or end_of_epoch
        or step == schedule.total_steps
      ):
        log.flush(step, state)
      ran = schedule.stage_at(step - 1)  # The stage of the step just taken.
      compressing = ran.kind_info.compresses
      if not compressing and step == ran.end:  # Full precision ends: evaluate it, keep it.
        log.flush(step, state)
        meta.update(_evaluate_fp(evaluate_split, state, writer, step))
        variables = {'params': state.params, 'batch_stats': state.batch_stats}
        # Every process takes part in an orbax save (it synchronizes them).
        checkpoint_lib.save_variables(os.path.join(workdir, 'fp_variables'), variables)
        distillation.reached(step, state, meta)
      if end_of_epoch and compressing:
        val = evaluate_split(state, 'val')
        if val:
          writer.write_scalars(step, {'val/accuracy': val['accuracy'], 'val/loss': val['loss']})
          if val['accuracy'] > best_val:
            best_val = val['accuracy']
            meta.update(best_val_accuracy=best_val, best_step=step, best_pass=ran.pass_index)
            log.flush(step, state)
            ckpt.save_best(
              step, setup_lib.state_tree(state), {'meta': meta}, best_val, rank=ran.pass_index
            )
      entered = schedule.transition_at(step)
      if entered is not None:  # A stage boundary: the next stage's state, checkpointed below.
        log.flush(step, state)
        state = _enter_stage(entered, state, setup, new_state, ckpt, replicated)
        if entered.pass_index != ran.pass_index:
          best_val = -1.0
      if (
        _crossed(before, step, run.checkpoints.checkpoint_every_steps)
        or schedule.is_boundary(step)
        or preemption.requested
      ):
        log.flush(step, state)  # Never save a state that went NaN.
        extra = _checkpoint_extra(step, schedule, data, train_iter, meta)
        ckpt.save(step, setup_lib.state_tree(state), extra)
        writer.flush()
      if preemption.requested:
        logging.warning(
          'Stopped at step %d after %s; rerun the same command to resume.',
          step,
          preemption.signal_name,
        )
        return {'preempted': True, 'step': step}

    val, test = evaluate_split(state, 'val'), evaluate_split(state, 'test')
    summary = summarize_run(run, setup, state, meta, val=val, test=test, steps=step)
    if run.distills:
      summary.update(distill_teacher=run.distill.teacher, teacher_sha256=meta['teacher_sha256'])
    prune = run.output
    if prune.magnitude_prune_pattern and prune.magnitude_prune_fraction:
      # The network as scoring and export read it (ec2t_jax.training.workdir.load_workdir).
      params, _ = tree_util.magnitude_prune(
        jax.device_get(state.params), prune.magnitude_prune_pattern, prune.magnitude_prune_fraction
      )
      pruned = evaluate_split(jax.device_put(state.replace(params=params), replicated), 'test')
      summary['magnitude_pruned_test_accuracy'] = pruned.get('accuracy')
    summary['wall_time_s'] = time.time() - start_time
    summary.update(
      {
        f'ec2t/{k}': float(v)
        for k, v in jax.device_get(p_statistics(state.opt_state, state.params)).items()
        if '/' not in k
      }
    )
    writer.write_scalars(
      step, {f'final/{k}': v for k, v in summary.items() if isinstance(v, (int, float))}
    )
    writer.close()
    if jax.process_index() == 0:
      workdir_lib.write_json(os.path.join(workdir, 'summary.json'), summary)
    print_summary(summary)
    return summary
  finally:
    if writer is not None:
      writer.close()
    ckpt.close()
