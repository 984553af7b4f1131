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
import queue
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

import ec2t_jax
from ec2t_jax import tree_util
from ec2t_jax.training import checkpoint as checkpoint_lib
from ec2t_jax.training import datasets, input_pipeline, metric_writers
from ec2t_jax.training import schedule as schedule_lib
from ec2t_jax.training import spec as spec_lib
from ec2t_jax.training import state as state_lib
from ec2t_jax.training import workdir as workdir_lib
from ec2t_jax.training.schedule import BEST, FP

# Size limit of the persistent compilation cache when `config.compilation_cache_dir`
# turns it on; the least recently used executables are evicted beyond it.
COMPILATION_CACHE_BYTES = 2 << 30


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
  spec_lib.parse(config, check_data=False, check_init_from=check_init_from)


def check_backend() -> list[jax.Device]:
  """`jax.devices()`, or a one-line ValueError when JAX cannot start its backend.

  JAX reports a platform that is asked for (`JAX_PLATFORMS=cuda`) but cannot
  start with a bare `AssertionError` or a long `RuntimeError`.

  Raises:
    ValueError: naming `JAX_PLATFORMS` and the fix.
  """
  try:
    return jax.devices()
  except (RuntimeError, AssertionError) as e:
    platforms = os.environ.get('JAX_PLATFORMS') or jax.config.jax_platforms or ''
    detail = ' '.join(str(e).split())[:200] or 'no backend could be initialized'
    raise ValueError(
      f'JAX cannot start a backend for JAX_PLATFORMS={platforms!r} ({type(e).__name__}: '
      f'{detail}); install the jax plugin of that accelerator (e.g. pip install '
      "'jax[cuda12]'), or set JAX_PLATFORMS=cpu"
    ) from e


def enable_compilation_cache(path: str) -> str | None:
  """Points JAX's persistent compilation cache at `path` (`~` expanded), before any compile.

  A cache the user chose already (`$JAX_COMPILATION_CACHE_DIR` or
  `jax.config.update('jax_compilation_cache_dir', ...)`) is left as it is. Only
  compilations that take at least a second are stored, so a restart of a large
  model skips most of its compile time (`docs/benchmarks.md`, section 3).

  Args:
    path: the cache directory, or '' to leave the cache off.

  Returns:
    The cache directory in use, or None when there is none.
  """
  current = jax.config.jax_compilation_cache_dir
  if current or not path:
    return current or None
  path = os.path.expanduser(path)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_compilation_cache_max_size', COMPILATION_CACHE_BYTES)
  return path


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """`jax.distributed.initialize` for `config.distributed` runs (multi-host), once."""
  if not config.get('distributed') or jax.distributed.is_initialized():
    return
  # On TPU pods and SLURM everything is detected; elsewhere name the coordinator.
  jax.distributed.initialize(
    coordinator_address=config.get('coordinator_address') or None,
    num_processes=config.get('num_processes') or None,
    process_id=config.process_id if config.get('process_id', -1) >= 0 else None,
  )
  if jax.process_count() > 1:
    # Set up the collectives now, while all processes are in step: the first
    # collective otherwise comes after compilation, and a process that lags
    # there by more than the handshake timeout (30 s with gloo) fails the run.
    multihost_utils.sync_global_devices('ec2t_jax:start')


def create_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """A one-axis (`'data'`) mesh over every device, or the first `config.num_devices`."""
  devices = jax.devices()
  if config.get('num_devices'):
    if jax.process_count() > 1 or not 0 < config.num_devices <= len(devices):
      raise ValueError(
        f'config.num_devices must be in [1, {len(devices)}] on one host, got {config.num_devices}'
      )
    devices = devices[: config.num_devices]
  return jax.sharding.Mesh(np.array(devices), ('data',))


# --- data ------------------------------------------------------------------------------------


class Data(NamedTuple):
  """A run's data: sources, the train/validation split and the batch sizes of this process.

  Attributes:
    train_source: random-access source of the 'train' split.
    test_source: the test split's source.
    train_indices: records of `train_source` used for training.
    val_indices: records of `train_source` held out for validation.
    steps_per_epoch: training batches per epoch.
    num_classes: classifier outputs.
    image_shape: one input image, `(height, width, channels)`.
    batch_size: training batch size of this process.
    eval_batch_size: evaluation batch size of this process.
    spec: the dataset's `datasets.DatasetSpec` (recipe, sizes, classes).
    normalization: per-channel `(mean, std)` of the pipelines: the config's,
      else the dataset's, else computed from the training records.
  """

  train_source: Any
  test_source: Any
  train_indices: np.ndarray
  val_indices: np.ndarray
  steps_per_epoch: int
  num_classes: int
  image_shape: tuple[int, ...]
  batch_size: int
  eval_batch_size: int
  spec: datasets.DatasetSpec | None = None
  normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None


def open_data(config: ml_collections.ConfigDict) -> Data:
  """Opens the config's dataset, splits off the validation records, fixes the normalization.

  The user's data (`tfds:`, `npz:`, `folder:`) hold out 10 % of the training
  records (at most 5,000) unless `config.validation_size` says otherwise, and
  are normalized with the mean and std of the remaining training records
  unless `config.normalization` gives them.

  Raises:
    datasets.DatasetNotPreparedError: for a tfds dataset not prepared yet.
    ValueError: for bad data, or a validation size, batch size or
      normalization the data cannot satisfy.
  """
  spec = datasets.spec_for_config(config)
  # Images of varying size (ImageNet, some tfds data) cannot be held in memory.
  in_memory = config.get('in_memory', True) and spec.image_shape is not None
  open_split = functools.partial(
    datasets.get_data_source, spec, data_dir=config.data_dir or None, in_memory=in_memory
  )
  train_source, test_source = open_split('train'), open_split(spec.test_split)
  num_train = config.get('num_train_examples') or len(train_source)
  val_size = config.validation_size
  val_size = spec.validation_size if val_size is None or val_size < 0 else val_size
  if not 0 <= val_size < num_train:
    raise ValueError(f'config.validation_size must be in [0, {num_train}), got {val_size}')
  train_indices, val_indices = input_pipeline.split_indices(num_train, val_size)
  batch_size = config.batch_size // jax.process_count()
  steps_per_epoch = input_pipeline.num_batches(
    len(train_indices), batch_size=batch_size, train=True
  )
  if config.get('steps_per_epoch'):
    steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
  if steps_per_epoch <= 0:
    raise ValueError(
      f'{len(train_indices)} training examples make no batch of {config.batch_size}; '
      'lower config.batch_size'
    )
  num_classes, image_shape = datasets.classes_and_shape(config)
  try:  # Refuses bad evaluation options now, not after the first epoch.
    input_pipeline.preprocess_ops(
      spec,
      train=False,
      image_size=config.get('eval_image_size') or image_shape[0],
      **_eval_options(config),
    )
  except ValueError as e:
    raise ValueError(
      f'config.eval_image_size / eval_crop_fraction / eval_resize_method: {e}'
    ) from e
  normalization = input_pipeline.parse_normalization(
    config.get('normalization'), channels=image_shape[-1]
  )
  if normalization is None:
    normalization = spec.normalization
  if normalization is None:
    normalization = input_pipeline.compute_normalization(train_source, train_indices)
    logging.info(
      'normalization of %s from its %d training records: mean %s, std %s '
      '(config.normalization overrides it)',
      spec.name,
      len(train_indices),
      *(', '.join(f'{v:.4f}' for v in part) for part in normalization),
    )
  if spec.normalization is None and isinstance(train_source, datasets.InMemorySource):
    val_classes = np.unique(train_source.labels[val_indices]).size
    if val_classes == 1 and spec.num_classes > 1:
      logging.warning(
        'the validation set of %s (the last %d training records) holds one class only: '
        'are the training records sorted by class? Shuffle them.',
        spec.name,
        len(val_indices),
      )
  return Data(
    train_source=train_source,
    test_source=test_source,
    train_indices=train_indices,
    val_indices=val_indices,
    steps_per_epoch=steps_per_epoch,
    num_classes=num_classes,
    image_shape=image_shape,
    batch_size=batch_size,
    eval_batch_size=(config.eval_batch_size or config.batch_size) // jax.process_count(),
    spec=spec,
    normalization=normalization,
  )


def create_input_iter(config: ml_collections.ConfigDict, data: Data) -> Prefetch:
  """The endless, checkpointable iterator of training batches, prefetched in a thread."""
  return Prefetch(
    _create_split(
      config,
      data,
      data.train_source,
      data.train_indices,
      batch_size=data.batch_size,
      train=True,
      worker_count=config.get('worker_count', 0),
    )
  )


def _eval_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The evaluation transform's options the config sets (`crop_fraction`, `resize_method`)."""
  options = {}
  if config.get('eval_crop_fraction'):
    options['crop_fraction'] = config.eval_crop_fraction
  if config.get('eval_resize_method'):
    options['resize_method'] = config.eval_resize_method
  return options


def _create_split(config, data, source, indices, **kwargs):
  """`input_pipeline.create_split` of `source` with the run's recipe and normalization."""
  image_size = data.image_shape[0]
  if not kwargs.get('train', True):
    kwargs.update(_eval_options(config))
    image_size = config.get('eval_image_size') or image_size
  return input_pipeline.create_split(
    source,
    seed=config.seed,
    dataset=data.spec or config.dataset,
    image_size=image_size,
    normalization=data.normalization,
    indices=indices,
    **kwargs,
  )


def eval_batches(
  config: ml_collections.ConfigDict, data: Data, split: str
) -> Iterator[dict[str, Any]]:
  """One pass over the `'val'` or `'test'` split (at most `config.num_eval_examples`)."""
  if split == 'val':
    source, indices = data.train_source, data.val_indices
    if len(indices) == 0:
      return iter(())
  else:
    source, indices = data.test_source, None
  limit = config.get('num_eval_examples')
  if limit:
    indices = np.arange(min(limit, len(source))) if indices is None else indices[:limit]
  return _create_split(
    config, data, source, indices, batch_size=data.eval_batch_size, train=False, num_epochs=1
  )


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, Any]:
  """This process's part of a batch as global arrays sharded on the leading axis."""
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
  }


# --- steps -----------------------------------------------------------------------------------


def _loss_and_accuracy(logits, labels):
  logits = logits.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return loss, (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


def train_step(
  state: state_lib.TrainState,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  *,
  skip_nonfinite: bool,
) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  """One optimization step; returns the new state and this step's metrics."""

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    logits, updates = state.apply_fn(
      variables, batch['image'], train=True, mutable=['batch_stats'], rngs={'dropout': rng}
    )
    loss, correct = _loss_and_accuracy(logits, batch['label'])
    return loss.mean(), (correct.mean(), updates.get('batch_stats', state.batch_stats))

  (loss, (accuracy, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  finite = jnp.isfinite(loss) & jnp.all(
    jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
  )
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if skip_nonfinite:
    new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
  metrics = {'loss': loss, 'accuracy': accuracy, 'nonfinite': (~finite).astype(jnp.float32)}
  return new_state, metrics


def eval_step(state: state_lib.TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Sums of loss, correct predictions and real examples over one (padded) batch."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  logits = state.apply_fn(variables, batch['image'], train=False)
  loss, correct = _loss_and_accuracy(logits, batch['label'])
  mask = batch.get('mask', jnp.ones_like(loss, bool)).astype(jnp.float32)
  return {
    'loss': jnp.sum(loss * mask),
    'correct': jnp.sum(correct * mask),
    'count': jnp.sum(mask),
  }


def evaluate(p_eval_step, state, batches, sharding) -> dict[str, float]:
  """Mean accuracy and loss over `batches` (`{}` when there are none)."""
  totals = None
  for batch in batches:
    out = jax.device_get(p_eval_step(state, to_global(batch, sharding)))
    totals = out if totals is None else {k: totals[k] + out[k] for k in totals}
  if totals is None:
    return {}
  count = max(float(totals['count']), 1.0)
  return {'accuracy': float(totals['correct']) / count, 'loss': float(totals['loss']) / count}


# --- the loop's helpers ----------------------------------------------------------------------


class Prefetch:
  """Produces the next batches in a background thread while the device computes.

  `get_state()` is the wrapped iterator's state right after the last batch that
  was *consumed* (not produced), so a checkpoint resumes exactly there.
  `set_state()` must come before the first `next()`.
  """

  def __init__(self, iterator, depth: int = 2):
    self._it = iterator
    self._depth = depth
    self._queue = None
    self._state = iterator.get_state()

  def set_state(self, state) -> None:
    if self._queue is not None:
      raise RuntimeError('set_state() after iteration started')
    self._it.set_state(state)
    self._state = state

  def get_state(self):
    return self._state

  def _produce(self):
    try:
      while True:
        batch = next(self._it)
        self._queue.put((batch, self._it.get_state()))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer.
      self._queue.put((e, None))

  def __iter__(self):
    return self

  def __next__(self):
    if self._queue is None:
      self._queue = queue.Queue(maxsize=self._depth)
      threading.Thread(target=self._produce, daemon=True).start()
    batch, state = self._queue.get()
    if isinstance(batch, BaseException):
      raise batch
    self._state = state
    return batch


class Preemption:
  """Turns SIGTERM and Ctrl-C (SIGINT) into a flag the training loop checks after each step.

  On the flag the loop saves a checkpoint and returns, so the same command
  resumes bit for bit. A second Ctrl-C raises `KeyboardInterrupt` at once (the
  checkpoints already on disk stay intact). Outside the main thread signals
  are left alone.

  Attributes:
    requested: True once a signal asked the run to stop.
    signal_name: `'SIGTERM'` or `'SIGINT'`, the first signal received.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signal_name = ''
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    for signum in self.SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # Not the main thread: no signal handling.
        break
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt(f'second {name}: stopping at once')
    if not self.requested:
      self.signal_name = name
      more = ' (Ctrl-C again to stop at once)' if signum == signal.SIGINT else ''
      logging.warning('%s received: saving a checkpoint and stopping%s.', name, more)
    self.requested = True

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous = {}


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


_STAGE_NAMES = {
  FP: 'full precision',
  schedule_lib.EC2T: 'EC2T',
  schedule_lib.FROZEN: 'frozen-assignment',
  schedule_lib.ECP: 'ECP',
}


def _stage_title(stage: schedule_lib.Stage) -> str:
  """'EC2T' for the default sequence's stages, 'ternarize (EC2T)' for named ones."""
  kind = _STAGE_NAMES[stage.kind]
  return kind if stage.label == stage.kind else f'{stage.label} ({kind})'


class TrainMetrics:
  """Keeps the training steps' metrics on device and writes their means now and then.

  Reading metrics back from the device every step would stall the pipeline,
  so `add` only queues them; `flush(step, state)` reads the queue at once,
  stops the run on a NaN/inf step (unless `skip_nonfinite`), and writes the
  means, the EC2T statistics of `state` and a progress line with an ETA.
  """

  def __init__(self, config, setup, writer, statistics_fn, step: int):
    self._config = config
    self._setup = setup
    self._schedule = setup.schedule
    self._writer = writer
    self._statistics = statistics_fn
    self._pending: list[tuple[int, dict[str, jax.Array]]] = []
    self._last = (time.time(), step)

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    """Queues the metrics of the step that ended at `step`."""
    self._pending.append((step, metrics))

  def flush(self, step: int, state: state_lib.TrainState) -> None:
    """Writes the queued metrics (no-op if none); raises `NonFiniteError` on a bad step."""
    if not self._pending:
      return
    host = jax.device_get([m for _, m in self._pending])
    bad = [s for (s, _), m in zip(self._pending, host, strict=True) if m['nonfinite'] > 0]
    if bad and not self._config.get('skip_nonfinite', False):
      raise NonFiniteError(
        f'the loss or a gradient became NaN/inf at step {bad[0]}; the run stopped and the last '
        'good checkpoint is kept. Lower the learning rate, or set --config.skip_nonfinite=True.'
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
    if stage.kind == FP:
      p = self._setup.passes[stage.group]
      lr = state_lib.learning_rate_schedule(p.settings, p.num_steps)
      scalars['train/learning_rate'] = float(lr(step - self._schedule.group_start(stage.group)))
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


def _plain_state(setup: state_lib.Setup) -> state_lib.TrainState:
  """A state of the starting variables with no optimizer (to evaluate them)."""
  return state_lib.TrainState.create(
    apply_fn=setup.model.apply,
    params=setup.variables['params'],
    tx=optax.identity(),
    batch_stats=setup.variables['batch_stats'],
  )


def _enter_stage(stage, state, setup, new_state, ckpt, sharding) -> state_lib.TrainState:
  """The state `stage` starts from at its first step.

  A new pass starts fresh optimizer state from the last step's variables, or
  from the best-by-validation checkpoint's (`start_from='best'`). A frozen
  stage that starts from the best checkpoint takes that checkpoint's whole
  state (weights, BatchNorm statistics, assignment, centroids) and sets the
  pass's update counters to where the assignment freezes.
  """
  schedule = setup.schedule
  current = schedule.stage_at(stage.start - 1).group
  if stage.start_from != BEST:
    if stage.group == current:
      return state
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    return new_state[stage.group](variables)
  best = ckpt.best_step()
  if best is None:
    raise ValueError(
      f'stage {stage.label!r} starts from the best checkpoint but the run saved none (no '
      "validation data?); rerun with start_from='last'"
    )
  # A best checkpoint holds the state of the stage that ran its step.
  best_group = schedule.stage_at(best - 1).group
  target = state_lib.state_tree(state_lib.abstract_train_state_of(setup, best_group))
  tree, _ = ckpt.restore(best, target, best=True)
  tree = jax.device_put(tree, sharding)
  logging.info('%s stage starts from the best checkpoint (step %d).', stage.label, best)
  if stage.group == best_group:
    freeze = schedule.freeze_step(stage.group)
    return state.replace(
      params=tree['params'],
      batch_stats=tree['batch_stats'],
      opt_state=ec2t_jax.state_utils.with_update_count(tree['opt_state'], freeze),
    )
  return new_state[stage.group]({'params': tree['params'], 'batch_stats': tree['batch_stats']})


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
  initialize_distributed(config)
  logging.info(
    'JAX devices: %s (process %d of %d)', check_backend(), jax.process_index(), jax.process_count()
  )
  # Every setting, the data's classes and shapes and the model's outputs are checked here,
  # before the workdir is touched: all problems in one error.
  spec_lib.parse(config)
  mesh = create_mesh(config)
  data = open_data(config)
  schedule = schedule_lib.create_schedule(config, data.steps_per_epoch)
  setup = state_lib.create_setup(
    config, schedule, num_classes=data.num_classes, image_shape=data.image_shape
  )
  lock = workdir_lib.claim_workdir(config, workdir)
  try:
    with Preemption() as preemption:
      return _train(config, workdir, mesh, data, setup, preemption, start_time)
  finally:
    if lock is not None:
      lock.release()


def _saved_summary(workdir: str, params: Any) -> dict[str, Any] | None:
  """`summary.json` if it belongs to `params` (the same params_sha256), else None."""
  path = os.path.join(workdir, 'summary.json')
  if not os.path.exists(path):
    return None
  try:
    saved = workdir_lib.read_json_object(path, 'the run summary')
  except ValueError as e:
    logging.warning('%s; computing the summary again', e)
    return None
  if saved.get('params_sha256') != state_lib.params_sha256(params):
    logging.warning(
      '%s does not belong to the newest checkpoint (another params_sha256); computing the '
      'summary again',
      path,
    )
    return None
  return saved


def _train(config, workdir, mesh, data, setup, preemption, start_time) -> dict[str, Any]:
  """The run in a claimed workdir: resume or start, the loop, the final summary."""
  schedule = setup.schedule
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  # Only the run that holds the workdir may remove the leftovers of interrupted saves.
  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.max_to_keep, cleanup_tmp=True)
  writer = None
  try:
    # Resume from the newest checkpoint, or start at step 0.
    step, tree, extra = ckpt.restore_latest(
      lambda s: state_lib.state_tree(state_lib.abstract_train_state(setup, s))
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
      saved = _saved_summary(workdir, tree['params'])
      if saved is not None:  # A finished run: change nothing on disk, show what it saved.
        logging.info('%s holds a finished run (step %d); its saved summary:', workdir, step)
        print_summary(saved)
        return saved

    p_train_step = jax.jit(
      functools.partial(train_step, skip_nonfinite=config.get('skip_nonfinite', False)),
      donate_argnums=(0,),
      out_shardings=(replicated, replicated),
    )
    p_eval_step = jax.jit(eval_step, out_shardings=replicated)
    p_statistics = jax.jit(ec2t_jax.statistics)
    new_state = {  # One compiled program per pass instead of many eager ops.
      group: jax.jit(
        functools.partial(state_lib.create_train_state, setup, group), out_shardings=replicated
      )
      for group in range(schedule.num_groups)
    }

    def evaluate_split(state, split):
      return evaluate(p_eval_step, state, eval_batches(config, data, split), data_sharding)

    writer = metric_writers.MetricWriter(
      workdir,
      write_files=jax.process_index() == 0,
      console_keys=('train/', 'val/', 'test/', 'fp/', 'ec2t/total', 'ec2t/entropy', 'progress/'),
    )
    writer.write_hparams(workdir_lib.flat_config(config))
    train_iter = create_input_iter(config, data)
    meta: dict[str, Any] = {}
    if step is None:
      step = 0
      first = schedule.stage_at(0)
      if first.kind != FP:  # Compression starts at once: record the network it starts from.
        meta.update(_evaluate_fp(evaluate_split, _plain_state(setup), writer, 0))
      state = new_state[first.group](setup.variables)
    else:
      logging.info(
        'Resuming %s from step %d (%s stage).', workdir, step, schedule.stage_at(step).label
      )
      restored = state_lib.with_state_tree(
        new_state[schedule.optimizer_at(step)](setup.variables), tree
      )
      state = jax.device_put(restored, replicated)
      train_iter.set_state(base64.b64decode(extra['data_iterator']))
      meta = dict(extra.get('meta', {}))

    base_rng = jax.random.key(config.seed + 1)
    log = TrainMetrics(config, setup, writer, p_statistics, step)
    # The best validation accuracy of the current pass (each pass keeps its own best).
    group = schedule.optimizer_at(step)
    best_val = float(meta.get('best_val_accuracy', -1.0))
    if meta.get('best_group', group) != group:
      best_val = -1.0
    if preemption.requested:  # During the set-up: no step since the last checkpoint.
      logging.warning(
        'Stopped at step %d (%s); rerun the same command to resume.', step, preemption.signal_name
      )
      return {'preempted': True, 'step': step}
    while step < schedule.total_steps:
      batch = to_global(next(train_iter), data_sharding)
      state, metrics = p_train_step(state, batch, jax.random.fold_in(base_rng, step))
      step += 1
      log.add(step, metrics)
      end_of_epoch = step % schedule.steps_per_epoch == 0
      if step % config.log_every_steps == 0 or end_of_epoch or step == schedule.total_steps:
        log.flush(step, state)
      ran = schedule.stage_at(step - 1)  # The stage of the step just taken.
      if ran.kind == FP and step == ran.end:  # Full precision ends: evaluate it, keep it.
        log.flush(step, state)
        meta.update(_evaluate_fp(evaluate_split, state, writer, step))
        variables = {'params': state.params, 'batch_stats': state.batch_stats}
        # Every process takes part in an orbax save (it synchronizes them).
        checkpoint_lib.save_variables(os.path.join(workdir, 'fp_variables'), variables)
      if end_of_epoch and ran.kind != FP:
        val = evaluate_split(state, 'val')
        if val:
          writer.write_scalars(step, {'val/accuracy': val['accuracy'], 'val/loss': val['loss']})
          if val['accuracy'] > best_val:
            best_val = val['accuracy']
            meta.update(best_val_accuracy=best_val, best_step=step, best_group=ran.group)
            log.flush(step, state)
            ckpt.save_best(
              step, state_lib.state_tree(state), {'meta': meta}, best_val, rank=ran.group
            )
      entered = schedule.transition_at(step)
      if entered is not None:  # A stage boundary: the next stage's state, checkpointed below.
        log.flush(step, state)
        state = _enter_stage(entered, state, setup, new_state, ckpt, replicated)
        if entered.group != ran.group:
          best_val = -1.0
      if (
        step % config.checkpoint_every_steps == 0
        or schedule.is_boundary(step)
        or preemption.requested
      ):
        log.flush(step, state)  # Never save a state that went NaN.
        extra = _checkpoint_extra(step, schedule, data, train_iter, meta)
        ckpt.save(step, state_lib.state_tree(state), extra)
        writer.flush()
      if preemption.requested:
        logging.warning(
          'Stopped at step %d after %s; rerun the same command to resume.',
          step,
          preemption.signal_name,
        )
        return {'preempted': True, 'step': step}

    val, test = evaluate_split(state, 'val'), evaluate_split(state, 'test')
    summary = summarize_run(config, setup, state, meta, val=val, test=test, steps=step)
    prune = config.get('magnitude_prune') or {}
    if prune.get('pattern') and prune.get('fraction'):
      # The network as scoring and export read it (ec2t_jax.training.workdir.load_workdir).
      params, _ = tree_util.magnitude_prune(
        jax.device_get(state.params), prune['pattern'], prune['fraction']
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


def summarize_run(config, setup, state, meta, *, val, test, steps) -> dict[str, Any]:
  """The run's summary: accuracies, sparsity, parameter counts, the params' hash, the schedule."""
  params = jax.device_get(state.params)
  per_layer, sparsity = tree_util.zero_fractions(params, setup.ternary_mask)
  _, total_sparsity = tree_util.zero_fractions(params)
  sizes = [np.size(x) for x in jax.tree.leaves(params)]
  selected = [bool(m) for m in jax.tree.leaves(setup.ternary_mask)]
  compressing = [p for p in setup.passes if p.kind != FP]
  method = state_lib.check_method(config)
  # γ and s of the last compression pass (config.ec2t's for the default stages); the
  # absmean baseline has neither.
  ec2t_settings = method == state_lib.EC2T_METHOD
  last = compressing[-1].settings if compressing else config.ec2t
  return {
    'model': config.model,
    'dataset': config.dataset,
    'method': method,
    'fp_test_accuracy': meta.get('fp_test_accuracy'),
    'fp_val_accuracy': meta.get('fp_val_accuracy'),
    'test_accuracy': test.get('accuracy'),
    'test_loss': test.get('loss'),
    'val_accuracy': val.get('accuracy'),
    'best_val_accuracy': meta.get('best_val_accuracy'),
    'best_step': meta.get('best_step'),
    'sparsity': sparsity,
    'total_sparsity': total_sparsity,
    'num_params': int(sum(sizes)),
    'num_ternary_params': int(sum(n for n, m in zip(sizes, selected, strict=True) if m)),
    'steps': steps,
    'params_sha256': state_lib.params_sha256(params),
    'per_layer_sparsity': per_layer,
    'gamma': float(last.gamma) if ec2t_settings else None,
    'init_scale': float(last.init_scale) if ec2t_settings else None,
    'passes': [
      {'name': p.name, 'kind': p.kind}
      | (
        {'gamma': p.settings.gamma, 'init_scale': p.settings.init_scale}
        if p.kind != FP and ec2t_settings
        else {}
      )
      for p in setup.passes
    ],
    'schedule': setup.schedule.to_dict(),
  }


def print_summary(summary: dict[str, Any]) -> None:
  """Prints the summary's main numbers as a small table."""
  rows = [
    ('method', summary.get('method', 'ec2t')),
    ('full-precision test accuracy', summary.get('fp_test_accuracy')),
    ('ternary test accuracy (final)', summary.get('test_accuracy')),
    ('magnitude-pruned test accuracy', summary.get('magnitude_pruned_test_accuracy')),
    ('ternary val accuracy (final)', summary.get('val_accuracy')),
    ('best val accuracy', summary.get('best_val_accuracy')),
    ('sparsity of ternary weights', summary.get('sparsity')),
    ('sparsity of all params', summary.get('total_sparsity')),
    ('params', summary.get('num_params')),
    ('steps', summary.get('steps')),
    ('wall time (s)', summary.get('wall_time_s')),
    ('params sha256', summary.get('params_sha256')),
  ]
  width = max(len(r[0]) for r in rows)
  lines = ['', 'EC2T run summary', '-' * (width + 20)]
  for name, value in rows:
    if value is None and name.startswith('magnitude'):  # Only runs that set it.
      continue
    if isinstance(value, float):
      value = f'{value:.4f}'
    lines.append(f'{name:<{width}}  {value}')
  print('\n'.join(lines), flush=True)
