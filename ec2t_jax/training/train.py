"""The EC2T training program: full precision → EC2T → frozen assignment, resumable.

`train_and_evaluate(config, workdir)` runs one configured job end to end:

1. optional full-precision training (`config.fp.num_epochs`, e.g. a
   compound-scaled super-network from scratch), or weights from
   `config.init_from` (an orbax directory written by `ec2t_jax.training.checkpoint.
   save_variables`, or a PyTorch `.pt`/`.pth` through `ec2t_jax.models.pytorch`);
2. the EC2T phase (`config.ec2t.num_epochs`), ternarizing with `ec2t_jax.ec2t`;
3. the frozen-assignment phase (`config.ec2t.frozen_epochs`).

One global step counter spans the phases; every phase boundary is an ordinary,
checkpointed step, so an interrupted run resumes exactly where it stopped.
Data parallelism uses a `jax.sharding.Mesh` over every device: batches are
sharded on their leading axis, params and EC2T state are replicated, and
BatchNorm statistics are computed over the global batch.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.experimental import multihost_utils

import ec2t_jax
from ec2t_jax import masks as masks_lib
from ec2t_jax import models, tree_util
from ec2t_jax.training import checkpoint as checkpoint_lib
from ec2t_jax.training import datasets, input_pipeline, metric_writers

FP, EC2T = 'fp', 'ec2t'


class TrainState(train_state.TrainState):
  """A Flax `TrainState` with BatchNorm statistics; EC2T lives in `opt_state`."""

  batch_stats: Any = None


class NonFiniteError(FloatingPointError):
  """The loss or a gradient became NaN or inf."""


# --- configuration ---------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Refuses bad settings before anything is computed or written.

  Raises:
    ValueError: naming the bad value and what would be valid.
  """
  models.names()  # Fail early if the registry is broken.
  if config.model not in models.names():
    raise ValueError(f'unknown model {config.model!r}; valid names: {", ".join(models.names())}')
  datasets.get_spec(config.dataset)  # Raises a ValueError listing the valid names.
  for name in ('batch_size', 'eval_batch_size', 'log_every_steps', 'checkpoint_every_steps'):
    if config.get(name) is not None and config[name] <= 0:
      raise ValueError(f'config.{name} must be > 0, got {config[name]}')
  n = config.get('num_devices') or jax.device_count()
  if config.batch_size % n:
    raise ValueError(f'config.batch_size={config.batch_size} must be divisible by the {n} devices')
  for phase in ('fp', 'ec2t'):
    for key in ('num_epochs', 'frozen_epochs'):
      value = config[phase].get(key)
      if value is not None and value < 0:
        raise ValueError(f'config.{phase}.{key} must be >= 0, got {value}')
  for key in ('learning_rate', 'latent_learning_rate', 'centroid_learning_rate'):
    for phase in ('fp', 'ec2t'):
      value = config[phase].get(key)
      if value is not None and value <= 0:
        raise ValueError(f'config.{phase}.{key} must be > 0, got {value}')
  if config.fp.num_epochs == 0 and not config.init_from:
    logging.warning('config.fp.num_epochs=0 and no config.init_from: EC2T starts from random init.')


def _flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
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


# Fields that may differ between the first run and a resume of the same job (and,
# for process_id, between the processes of one multi-process run).
_RESUMABLE_FIELDS = (
  'overwrite',
  'log_every_steps',
  'checkpoint_every_steps',
  'data_dir',
  'worker_count',
  'process_id',
  'coordinator_address',
  'compilation_cache_dir',
)

# Size limit of the persistent compilation cache when `config.compilation_cache_dir`
# turns it on; the least recently used executables are evicted beyond it.
COMPILATION_CACHE_BYTES = 2 << 30


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


def _write_json(path: str, value: Any) -> None:
  """Writes JSON through a temporary file: never a half-written file, even after SIGKILL."""
  with open(f'{path}.tmp', 'w') as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(f'{path}.tmp', path)


def _claim_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks the workdir is writable and holds no run of a different config."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f'workdir {workdir!r} cannot be created: {e.strerror}') from e
  if not os.access(workdir, os.W_OK):
    raise ValueError(f'workdir {workdir!r} is not writable; pass a --workdir you can write to')
  path = os.path.join(workdir, 'config.json')
  mine = {k: v for k, v in _flat_config(config).items() if k not in _RESUMABLE_FIELDS}
  if os.path.exists(path) and not config.get('overwrite', False):
    with open(path) as f:
      theirs = {k: v for k, v in json.load(f).items() if k not in _RESUMABLE_FIELDS}
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
      shown = ', '.join(f'{k}: {theirs.get(k)!r} -> {mine.get(k)!r}' for k in diff[:5])
      raise ValueError(
        f'workdir {workdir!r} holds a run of a different config ({shown}); use another '
        '--workdir, or --config.overwrite=True to start over there'
      )
  if jax.process_count() > 1:
    # Every process has read the workdir as it was; only now may process 0 change it.
    # (A process that read process 0's fresh config.json could decide differently.)
    multihost_utils.sync_global_devices('ec2t_jax:workdir_checked')
  if jax.process_index() == 0:
    _write_json(path, _flat_config(config))


# --- model, optimizers, state ----------------------------------------------------------------


def create_model(config: ml_collections.ConfigDict, num_classes: int):
  """The registered linen module of `config.model`, in bfloat16 if `config.half_precision`."""
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  kwargs = dict(config.get('model_kwargs') or {})
  return models.create(config.model, num_classes=num_classes, dtype=dtype, **kwargs)


def initial_variables(model, image_shape: tuple[int, ...], seed: int) -> dict[str, Any]:
  """`model.init` on a dummy batch: `{'params': ..., 'batch_stats': ...}` (float32)."""
  rng = jax.random.key(seed)

  @jax.jit
  def init(rng):
    return model.init({'params': rng, 'dropout': rng}, jnp.zeros((1, *image_shape)), train=False)

  variables = dict(init(rng))
  variables.setdefault('batch_stats', {})
  return {'params': variables['params'], 'batch_stats': variables['batch_stats']}


def _schedule(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  lr = cfg.learning_rate
  name = cfg.get('schedule', 'constant')
  if name == 'constant':
    return optax.constant_schedule(lr)
  if name == 'cosine':
    return optax.cosine_decay_schedule(lr, max(num_steps, 1))
  raise ValueError(f"unknown schedule {name!r}; valid: 'constant', 'cosine'")


def create_fp_optimizer(cfg: ml_collections.ConfigDict, num_steps: int):
  """The full-precision phase's optimizer (`cfg` = `config.fp`)."""
  schedule = _schedule(cfg, num_steps)
  decay = optax.add_decayed_weights(cfg.weight_decay) if cfg.weight_decay else optax.identity()
  if cfg.optimizer == 'sgd':
    opt = optax.sgd(schedule, momentum=cfg.momentum, nesterov=cfg.nesterov)
  elif cfg.optimizer == 'adam':
    opt = optax.adam(schedule)
  else:
    raise ValueError(f"unknown config.fp.optimizer {cfg.optimizer!r}; valid: 'sgd', 'adam'")
  return optax.chain(decay, opt)


def compression_masks(
  cfg: ml_collections.ConfigDict, model, params: Any, image_shape: tuple[int, ...]
) -> tuple[Any, Any]:
  """The ternary and prune masks of `config.ec2t` for `params`."""
  if cfg.get('ternary_pattern'):
    ternary_mask = masks_lib.from_regex(params, cfg.ternary_pattern, cfg.get('ternary_exclude'))
  else:
    order = masks_lib.call_order(
      model, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32), train=False
    )
    ternary_mask = masks_lib.default_ternary_mask(
      params,
      order=order,
      keep_first=cfg.keep_first,
      keep_last=cfg.keep_last,
      keep_pattern=cfg.get('keep_pattern') or None,
    )
  prune_mask = None
  if cfg.get('prune_pattern'):
    prune_mask = masks_lib.from_regex(params, cfg.prune_pattern)
    prune_mask = jax.tree.map(lambda p, t: p and not t, prune_mask, ternary_mask)
  return ternary_mask, prune_mask


def create_ec2t_optimizer(
  cfg: ml_collections.ConfigDict, ternary_mask: Any, prune_mask: Any, freeze_at: int
):
  """`ec2t_jax.ec2t` configured by `config.ec2t`; the frozen phase starts at `freeze_at`."""
  return ec2t_jax.ec2t(
    ternary_mask,
    gamma=cfg.gamma,
    init_scale=cfg.init_scale,
    sustain=cfg.sustain,
    p0_min=cfg.p0_min,
    centroid_floor_std=cfg.centroid_floor_std,
    latent_optimizer=optax.adam(cfg.latent_learning_rate),
    centroid_optimizer=optax.adam(cfg.centroid_learning_rate),
    fp_optimizer=ec2t_jax.default_fp_optimizer(cfg.learning_rate, cfg.weight_decay),
    prune_mask=prune_mask,
    freeze_assignment_at=freeze_at,
    reference_parity=cfg.reference_parity,
  )


def _check_variables(loaded: Any, expected: Any, source: str) -> None:
  """Raises one ValueError listing missing, extra and mis-shaped leaves."""
  got = {n: np.shape(x) for n, x in tree_util.named_leaves(loaded)}
  want = {n: np.shape(x) for n, x in tree_util.named_leaves(expected)}
  problems = [f'missing {n} {want[n]}' for n in sorted(set(want) - set(got))]
  problems += [f'unexpected {n} {got[n]}' for n in sorted(set(got) - set(want))]
  problems += [
    f'{n}: expected {want[n]}, found {got[n]}'
    for n in sorted(set(want) & set(got))
    if want[n] != got[n]
  ]
  if problems:
    raise ValueError(
      f'config.init_from={source!r} does not fit the model ({len(problems)} problems): '
      + '; '.join(problems[:6])
    )


def load_init_from(config: ml_collections.ConfigDict, expected: dict[str, Any]) -> dict[str, Any]:
  """Pretrained variables from `config.init_from` (orbax directory or PyTorch file)."""
  source = config.init_from
  if source.endswith(('.pt', '.pth')):
    from ec2t_jax.models import pytorch as convert

    kwargs = dict(config.get('model_kwargs') or {})
    loaded = convert.from_pytorch(source, config.model, num_classes=config.num_classes, **kwargs)
  else:
    loaded = checkpoint_lib.load_variables(source)
  loaded = {'params': loaded['params'], 'batch_stats': loaded.get('batch_stats') or {}}
  _check_variables(loaded, expected, source)
  return jax.tree.map(lambda x, e: jnp.asarray(x, e.dtype), loaded, expected)


# --- steps -----------------------------------------------------------------------------------


def _loss_and_accuracy(logits, labels):
  logits = logits.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return loss, (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


def train_step(
  state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *, skip_nonfinite: bool
) -> tuple[TrainState, dict[str, jax.Array]]:
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


def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
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


# --- the run ---------------------------------------------------------------------------------


class _Prefetch:
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


class _Preemption:
  """Turns SIGTERM into a flag the training loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: no signal handling.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and stopping.')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def params_sha256(params: Any) -> str:
  """A hash of the params' bytes in a fixed leaf order (sorted paths), to compare runs."""
  h = hashlib.sha256()
  for name, leaf in sorted(tree_util.named_leaves(jax.device_get(params))):
    arr = np.ascontiguousarray(np.asarray(leaf))
    h.update(f'{name}:{arr.dtype}:{arr.shape};'.encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class _Run:
  """Everything one `train_and_evaluate` call sets up, kept together."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir
    self.spec = datasets.get_spec(config.dataset)
    self.num_classes = config.get('num_classes') or self.spec.num_classes
    self.image_shape = tuple(
      config.get('image_shape') or self.spec.image_shape or (config.image_size,) * 2 + (3,)
    )
    devices = jax.devices()
    if config.get('num_devices'):
      if jax.process_count() > 1 or not 0 < config.num_devices <= len(devices):
        raise ValueError(
          f'config.num_devices must be in [1, {len(devices)}] on one host, got {config.num_devices}'
        )
      devices = devices[: config.num_devices]
    self.devices = devices
    self.mesh = jax.sharding.Mesh(np.array(devices), ('data',))
    self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.data_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec('data'))
    self.local_batch = config.batch_size // jax.process_count()
    self.local_eval_batch = (config.eval_batch_size or config.batch_size) // jax.process_count()

  # Data ---------------------------------------------------------------------------------------

  def open_data(self) -> None:
    c = self.config
    in_memory = c.get('in_memory', self.spec.name != 'imagenet2012')
    self.train_source = datasets.get_data_source(
      c.dataset, 'train', data_dir=c.data_dir or None, in_memory=in_memory
    )
    self.test_source = datasets.get_data_source(
      c.dataset, self.spec.test_split, data_dir=c.data_dir or None, in_memory=in_memory
    )
    num_train = c.get('num_train_examples') or len(self.train_source)
    val_size = c.validation_size
    val_size = self.spec.validation_size if val_size is None or val_size < 0 else val_size
    if not 0 <= val_size < num_train:
      raise ValueError(f'config.validation_size must be in [0, {num_train}), got {val_size}')
    self.train_idx, self.val_idx = input_pipeline.split_indices(num_train, val_size)
    self.steps_per_epoch = input_pipeline.num_batches(
      len(self.train_idx), batch_size=self.local_batch, train=True
    )
    if c.get('steps_per_epoch'):
      self.steps_per_epoch = min(self.steps_per_epoch, c.steps_per_epoch)
    if self.steps_per_epoch <= 0:
      raise ValueError(
        f'{len(self.train_idx)} training examples make no batch of {c.batch_size}; '
        'lower config.batch_size'
      )

  def train_iterator(self):
    return _Prefetch(self._train_split())

  def _train_split(self):
    return input_pipeline.create_split(
      self.train_source,
      batch_size=self.local_batch,
      train=True,
      seed=self.config.seed,
      dataset=self.config.dataset,
      image_size=self.image_shape[0],
      indices=self.train_idx,
      worker_count=self.config.get('worker_count', 0),
    )

  def eval_batches(self, split: str) -> Iterator[dict[str, Any]]:
    source, indices = (
      (self.train_source, self.val_idx) if split == 'val' else (self.test_source, None)
    )
    if indices is not None and len(indices) == 0:
      return iter(())
    limit = self.config.get('num_eval_examples')
    if limit:
      indices = np.arange(min(limit, len(source))) if indices is None else indices[:limit]
    return input_pipeline.create_split(
      source,
      batch_size=self.local_eval_batch,
      train=False,
      seed=self.config.seed,
      dataset=self.config.dataset,
      image_size=self.image_shape[0],
      indices=indices,
      num_epochs=1,
    )

  def to_global(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {
      k: jax.make_array_from_process_local_data(self.data_sharding, np.asarray(v))
      for k, v in batch.items()
    }

  # State --------------------------------------------------------------------------------------

  def build(self) -> None:
    c = self.config
    self.model = create_model(c, self.num_classes)
    self.variables = initial_variables(self.model, self.image_shape, c.seed)
    if c.init_from:
      self.variables = load_init_from(c, self.variables)
    spe = self.steps_per_epoch
    self.fp_steps = c.fp.num_epochs * spe
    self.ec2t_steps = c.ec2t.num_epochs * spe
    self.frozen_steps = c.ec2t.frozen_epochs * spe
    self.total_steps = self.fp_steps + self.ec2t_steps + self.frozen_steps
    self.fp_tx = create_fp_optimizer(c.fp, self.fp_steps)
    self.ternary_mask, self.prune_mask = compression_masks(
      c.ec2t, self.model, self.variables['params'], self.image_shape
    )
    self.ec2t_tx = create_ec2t_optimizer(
      c.ec2t, self.ternary_mask, self.prune_mask, freeze_at=self.ec2t_steps
    )
    # Validates the masks (selects something, floating leaves) before any step.
    ec2t_jax.param_labels(self.variables['params'], self.ternary_mask, self.prune_mask)
    step_fn = functools.partial(train_step, skip_nonfinite=c.get('skip_nonfinite', False))
    self.p_train_step = jax.jit(
      step_fn, donate_argnums=(0,), out_shardings=(self.replicated, self.replicated)
    )
    self.p_eval_step = jax.jit(eval_step, out_shardings=self.replicated)
    self.p_statistics = jax.jit(ec2t_jax.statistics)
    self._state_fns = {}

  def _make_state(self, phase: str, variables: dict[str, Any]) -> TrainState:
    tx = self.fp_tx if phase == FP else self.ec2t_tx
    state = TrainState.create(
      apply_fn=self.model.apply,
      params=variables['params'],
      tx=tx,
      batch_stats=variables['batch_stats'],
    )
    if phase == EC2T:
      state = state.replace(params=ec2t_jax.ternarize(state.params, state.opt_state))
    return state

  def new_state(self, phase: str, variables: dict[str, Any]) -> TrainState:
    """A fresh train state of `phase` (EC2T: initialized and ternarized), replicated."""
    if phase not in self._state_fns:  # One compiled program instead of many eager ops.
      self._state_fns[phase] = jax.jit(
        functools.partial(self._make_state, phase), out_shardings=self.replicated
      )
    return self._state_fns[phase](variables)

  def phase_of(self, step: int) -> str:
    return FP if step < self.fp_steps else EC2T

  def target_for_step(self, step: int) -> TrainState:
    return jax.eval_shape(functools.partial(self._make_state, self.phase_of(step)), self.variables)

  # Evaluation ---------------------------------------------------------------------------------

  def evaluate(self, state: TrainState, split: str) -> dict[str, float]:
    totals = None
    for batch in self.eval_batches(split):
      out = jax.device_get(self.p_eval_step(state, self.to_global(batch)))
      totals = out if totals is None else {k: totals[k] + out[k] for k in totals}
    if totals is None:
      return {}
    count = max(float(totals['count']), 1.0)
    return {'accuracy': float(totals['correct']) / count, 'loss': float(totals['loss']) / count}


def _state_tree(state: TrainState) -> dict[str, Any]:
  return {
    'step': state.step,
    'params': state.params,
    'batch_stats': state.batch_stats,
    'opt_state': state.opt_state,
  }


def _with_tree(state: TrainState, tree: dict[str, Any]) -> TrainState:
  return state.replace(
    step=tree['step'],
    params=tree['params'],
    batch_stats=tree['batch_stats'],
    opt_state=tree['opt_state'],
  )


def _sparsity_by_layer(params: Any, mask: Any) -> tuple[dict[str, float], float, float, int]:
  """Per-layer zero fractions of the selected leaves, their total, all params' total, count."""
  per_layer = {}
  zeros = size = all_zeros = all_size = 0
  for (name, leaf), selected in zip(
    tree_util.named_leaves(params), jax.tree.leaves(mask), strict=True
  ):
    arr = np.asarray(leaf)
    z = int(np.sum(arr == 0))
    all_zeros += z
    all_size += arr.size
    if selected:
      per_layer[name] = z / arr.size
      zeros += z
      size += arr.size
  return per_layer, zeros / max(size, 1), all_zeros / max(all_size, 1), all_size


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the configured job in `workdir` (resuming if it holds checkpoints).

  Args:
    config: a config from `configs/` (see `configs/mnist.py` for every field).
    workdir: where checkpoints, metrics, TensorBoard files and `summary.json` go.

  Returns:
    The summary dict also written to `workdir/summary.json`.
  """
  start_time = time.time()
  if config.get('distributed') and not jax.distributed.is_initialized():
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
  logging.info(
    'JAX devices: %s (process %d of %d)', jax.devices(), jax.process_index(), jax.process_count()
  )
  validate_config(config)
  cache = enable_compilation_cache(config.get('compilation_cache_dir', ''))
  logging.info('persistent compilation cache: %s', cache or 'off')
  run = _Run(config, workdir)
  run.open_data()  # Missing datasets fail here, before the workdir is touched.
  run.build()  # Bad masks, init_from or hyperparameters fail here too.
  _claim_workdir(config, workdir)
  writer = metric_writers.MetricWriter(
    workdir,
    write_files=jax.process_index() == 0,
    console_keys=('train/', 'val/', 'test/', 'fp/', 'ec2t/total', 'ec2t/entropy', 'progress/'),
  )
  writer.write_hparams(_flat_config(config))
  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.max_to_keep)

  step, tree, extra = ckpt.restore_latest(lambda s: _state_tree(run.target_for_step(s)))
  on_disk = ckpt.steps() if step is None and not config.get('overwrite', False) else []
  if on_disk:
    # Starting over would overwrite them: refuse instead of losing a run silently.
    raise ValueError(
      f'workdir {workdir!r} holds checkpoints (steps {on_disk}) but none can be restored '
      'into this train state (written by a different model, or by an older ec2t_jax whose '
      'EC2T state stored layers one by one; see the warnings above); use another '
      '--workdir, or --config.overwrite=True to start over there'
    )
  meta: dict[str, Any] = {}
  train_iter = run.train_iterator()
  if step is None:
    step = 0
    if run.fp_steps > 0:
      state = run.new_state(FP, run.variables)
    else:
      meta.update(_evaluate_fp(run, run.new_state(FP, run.variables), writer, 0))
      state = run.new_state(EC2T, run.variables)
  else:
    logging.info('Resuming %s from step %d (%s phase).', workdir, step, run.phase_of(step))
    state = jax.device_put(
      _with_tree(run.new_state(run.phase_of(step), run.variables), tree), run.replicated
    )
    train_iter.set_state(base64.b64decode(extra['data_iterator']))
    meta = dict(extra.get('meta', {}))

  def save(step, state):
    extra = {
      'data_iterator': base64.b64encode(train_iter.get_state()).decode('ascii'),
      'meta': meta,
      'phase': run.phase_of(step),
      'steps_per_epoch': run.steps_per_epoch,
    }
    ckpt.save(step, _state_tree(state), extra)
    return extra

  base_rng = jax.random.key(config.seed + 1)
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  last_log = (time.time(), step)
  phase_names = {FP: 'full precision', EC2T: 'EC2T'}

  def flush_metrics(step):
    nonlocal pending, last_log
    if not pending:
      return
    host = jax.device_get([m for _, m in pending])
    bad = [s for (s, _), m in zip(pending, host, strict=True) if m['nonfinite'] > 0]
    if bad and not config.get('skip_nonfinite', False):
      raise NonFiniteError(
        f'the loss or a gradient became NaN/inf at step {bad[0]}; the run stopped and the last '
        'good checkpoint is kept. Lower the learning rate, or set --config.skip_nonfinite=True.'
      )
    now = time.time()
    rate = (step - last_log[1]) / max(now - last_log[0], 1e-9)
    phase = 'frozen' if step > run.fp_steps + run.ec2t_steps else run.phase_of(step - 1)
    scalars = {
      'train/loss': np.mean([m['loss'] for m in host]),
      'train/accuracy': np.mean([m['accuracy'] for m in host]),
      'train/skipped_nonfinite': float(sum(m['nonfinite'] for m in host)),
      'progress/steps_per_second': rate,
      'progress/fraction': step / max(run.total_steps, 1),
    }
    if phase == FP:
      scalars['train/learning_rate'] = float(_schedule(config.fp, run.fp_steps)(step))
    else:
      stats = jax.device_get(run.p_statistics(state.opt_state))
      scalars.update({f'ec2t/{k}': float(v) for k, v in stats.items()})
    writer.write_scalars(step, scalars)
    logging.info(
      '%s phase, step %d/%d (%.1f%%), %.1f steps/s, ETA %s',
      phase_names.get(phase, 'frozen-assignment'),
      step,
      run.total_steps,
      100.0 * step / max(run.total_steps, 1),
      rate,
      _format_eta((run.total_steps - step) / max(rate, 1e-9)),
    )
    pending = []
    last_log = (now, step)

  best_val = float(meta.get('best_val_accuracy', -1.0))
  with _Preemption() as preemption:
    while step < run.total_steps:
      batch = run.to_global(next(train_iter))
      state, metrics = run.p_train_step(state, batch, jax.random.fold_in(base_rng, step))
      step += 1
      pending.append((step, metrics))
      end_of_epoch = step % run.steps_per_epoch == 0
      if step % config.log_every_steps == 0 or end_of_epoch or step == run.total_steps:
        flush_metrics(step)
      if step == run.fp_steps:  # Phase boundary: evaluate the FP network, start EC2T.
        flush_metrics(step)
        meta.update(_evaluate_fp(run, state, writer, step))
        variables = {'params': state.params, 'batch_stats': state.batch_stats}
        # Every process takes part in an orbax save (it synchronizes them).
        checkpoint_lib.save_variables(os.path.join(workdir, 'fp_variables'), variables)
        state = run.new_state(EC2T, variables)
      if end_of_epoch and step > run.fp_steps:
        val = run.evaluate(state, 'val')
        if val:
          writer.write_scalars(step, {'val/accuracy': val['accuracy'], 'val/loss': val['loss']})
          if val['accuracy'] > best_val:
            best_val = val['accuracy']
            meta['best_val_accuracy'] = best_val
            meta['best_step'] = step
            flush_metrics(step)
            ckpt.save_best(step, _state_tree(state), {'meta': meta}, best_val)
      if (
        step % config.checkpoint_every_steps == 0
        or step == run.fp_steps
        or step == run.fp_steps + run.ec2t_steps
        or step == run.total_steps
        or preemption.requested
      ):
        flush_metrics(step)  # Never save a state that went NaN.
        save(step, state)
        writer.flush()
      if preemption.requested:
        writer.close()
        ckpt.close()
        logging.warning('Stopped at step %d after SIGTERM; rerun the same command to resume.', step)
        return {'preempted': True, 'step': step}

  summary = _summarize_run(run, state, meta, ckpt, step, start_time)
  writer.write_scalars(
    step, {f'final/{k}': v for k, v in summary.items() if isinstance(v, (int, float))}
  )
  writer.close()
  ckpt.close()
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, 'summary.json'), summary)
  _print_summary(summary)
  return summary


class Workdir(NamedTuple):
  """A trained run read back from its workdir (see `load_workdir`)."""

  config: ml_collections.ConfigDict
  model: Any
  variables: dict[str, Any]
  opt_state: Any
  step: int
  ternary_mask: Any
  prune_mask: Any
  image_shape: tuple[int, ...]


def config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was started with (`workdir/config.json`)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir!r} holds no config.json: is it a workdir of main.py?')
  with open(path) as f:
    flat = json.load(f)
  nested: dict[str, Any] = {}
  for key, value in flat.items():
    node = nested
    *parents, leaf = key.split('.')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  nested.setdefault('model_kwargs', {})
  return ml_collections.ConfigDict(nested)


def load_workdir(workdir: str, *, best: bool = False) -> Workdir:
  """Reads the newest (or the best-by-validation) checkpoint of a run, without its dataset.

  Args:
    workdir: a directory written by `train_and_evaluate`.
    best: read the best-by-validation checkpoint instead of the newest.

  Returns:
    A `Workdir` with the config, the linen module, `{'params', 'batch_stats'}`,
    the optimizer state (EC2T state after the full-precision phase), the step,
    and the compression masks.
  """
  config = config_from_workdir(workdir)
  shapes_only = ml_collections.ConfigDict(config.to_dict())
  shapes_only.init_from = ''  # The checkpoint holds the weights; skip the pretrained file.
  run = _Run(shapes_only, workdir)
  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.get('max_to_keep', 3))
  try:
    if best:
      step = ckpt.best_step()
      if step is None:
        raise FileNotFoundError(f'{workdir!r} has no best-by-validation checkpoint')
    else:
      steps = ckpt.steps()
      if not steps:
        raise FileNotFoundError(f'{workdir!r} has no checkpoint')
      step = steps[-1]
    extra = ckpt.read_extra(ckpt.steps()[-1])
    if 'steps_per_epoch' in extra:
      run.steps_per_epoch = int(extra['steps_per_epoch'])
    else:  # Checkpoints of older versions: count from the dataset.
      run.open_data()
    run.build()
    tree, _ = ckpt.restore(step, _state_tree(run.target_for_step(step)), best=best)
  finally:
    ckpt.close()
  return Workdir(
    config=config,
    model=run.model,
    variables={'params': tree['params'], 'batch_stats': tree['batch_stats']},
    opt_state=tree['opt_state'],
    step=int(step),
    ternary_mask=run.ternary_mask,
    prune_mask=run.prune_mask,
    image_shape=run.image_shape,
  )


def _evaluate_fp(run: _Run, state: TrainState, writer, step: int) -> dict[str, float]:
  """Validation and test accuracy of the full-precision network (before EC2T)."""
  val, test = run.evaluate(state, 'val'), run.evaluate(state, 'test')
  out = {'fp_test_accuracy': test.get('accuracy', float('nan'))}
  if val:
    out['fp_val_accuracy'] = val['accuracy']
  writer.write_scalars(step, {f'fp/{k}': v for k, v in out.items()})
  return out


def _summarize_run(run, state, meta, ckpt, step, start_time) -> dict[str, Any]:
  val = run.evaluate(state, 'val')
  test = run.evaluate(state, 'test')
  per_layer, sparsity, total_sparsity, num_params = _sparsity_by_layer(
    state.params, run.ternary_mask
  )
  summary = {
    'model': run.config.model,
    'dataset': run.config.dataset,
    'fp_test_accuracy': meta.get('fp_test_accuracy'),
    'fp_val_accuracy': meta.get('fp_val_accuracy'),
    'test_accuracy': test.get('accuracy'),
    'test_loss': test.get('loss'),
    'val_accuracy': val.get('accuracy'),
    'best_val_accuracy': meta.get('best_val_accuracy'),
    'best_step': meta.get('best_step'),
    'sparsity': sparsity,
    'total_sparsity': total_sparsity,
    'num_params': num_params,
    'num_ternary_params': int(
      sum(
        np.size(x)
        for x, m in zip(
          jax.tree.leaves(state.params), jax.tree.leaves(run.ternary_mask), strict=True
        )
        if m
      )
    ),
    'wall_time_s': time.time() - start_time,
    'steps': step,
    'params_sha256': params_sha256(state.params),
    'per_layer_sparsity': per_layer,
    'gamma': run.config.ec2t.gamma,
    'init_scale': run.config.ec2t.init_scale,
  }
  summary.update(
    {
      f'ec2t/{k}': float(v)
      for k, v in jax.device_get(run.p_statistics(state.opt_state)).items()
      if '/' not in k
    }
  )
  return summary


def _print_summary(summary: dict[str, Any]) -> None:
  rows = [
    ('full-precision test accuracy', summary.get('fp_test_accuracy')),
    ('ternary test accuracy (final)', summary.get('test_accuracy')),
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
    if isinstance(value, float):
      value = f'{value:.4f}'
    lines.append(f'{name:<{width}}  {value}')
  print('\n'.join(lines), flush=True)
