"""One reading of a run's config: `parse(config) -> RunSpec`, every check in one pass.

The `ml_collections.ConfigDict` is the user's format (recipes in `configs/`,
`--config.x=y` overrides). `parse` reads it once, checks every field it can
without training (names, ranges, patterns, stages, the method, the data's
classes and image shape from its metadata, the model's output shape by
`jax.eval_shape`) and reports **every** problem it finds in one error, before
the trainer touches the workdir. What it returns is a tree of frozen
dataclasses that the program below passes around instead of the config.

Example:
  >>> from ec2t_jax.configs import mnist
  >>> spec = parse(mnist.get_config('smoke'))
  >>> spec.model.name, spec.data.num_classes, spec.data.image_shape
  ('lenet5', 10, (28, 28, 1))
  >>> [s.kind for s in spec.stages]
  ['fp', 'ec2t', 'frozen']
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ec2t_jax.training import schedule as schedule_lib

__all__ = [
  'CheckpointSpec',
  'ConfigError',
  'DataSpec',
  'ModelSpec',
  'OutputSpec',
  'RunSpec',
  'RuntimeSpec',
  'missing_init_from',
  'parse',
]

# Settings that are counts where 0 means "no limit" (negative ones are refused).
_LIMITS = {
  'steps_per_epoch': '0 = every batch of the training set',
  'num_eval_examples': '0 = the whole evaluation set',
  'num_train_examples': "0 = the source's size",
}
_POSITIVE = ('batch_size', 'eval_batch_size', 'log_every_steps', 'checkpoint_every_steps')
_FINITE_EC2T = ('gamma', 'init_scale', 'sustain', 'p0_min', 'centroid_floor_std')
_PATTERNS = ('ternary_pattern', 'ternary_exclude', 'keep_pattern', 'prune_pattern')


class ConfigError(ValueError):
  """Every problem `parse` found in a config, said in one line.

  Attributes:
    problems: one message per problem, each naming the field, its value and
      what would be valid.
  """

  def __init__(self, problems: list[str]):
    self.problems = list(problems)
    if len(self.problems) == 1:
      message = self.problems[0]
    else:
      message = f'{len(self.problems)} problems in the config: ' + ' '.join(
        f'({i}) {p.rstrip(".")}.' for i, p in enumerate(self.problems, 1)
      )
    super().__init__(message)


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """The data of a run: which dataset, how it is split, batched and preprocessed.

  `num_classes` and `image_shape` are resolved: the config's where it sets
  them, else the dataset's metadata.
  """

  name: str
  data_dir: str
  num_classes: int
  image_shape: tuple[int, ...]
  image_size: int
  normalization: str
  eval_crop_fraction: float
  eval_resize_method: str
  eval_image_size: int
  validation_size: int
  num_train_examples: int
  num_eval_examples: int
  steps_per_epoch: int
  in_memory: bool
  worker_count: int
  batch_size: int
  eval_batch_size: int


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The network: its registry name (or `'package.module:factory'`) and how it starts."""

  name: str
  kwargs: Mapping[str, Any]
  half_precision: bool
  init_from: str
  needs_init_from: bool
  grow_base_model: str
  grow_base_model_kwargs: Mapping[str, Any]
  grow_split: str
  grow_seed: int


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
  """Logging and checkpoint cadence, and what happens to a workdir's old run."""

  log_every_steps: int
  checkpoint_every_steps: int
  max_to_keep: int
  overwrite: bool


@dataclasses.dataclass(frozen=True)
class RuntimeSpec:
  """Seed, devices, processes, the compilation cache and the NaN policy."""

  seed: int
  skip_nonfinite: bool
  num_devices: int
  distributed: bool
  coordinator_address: str
  num_processes: int
  process_id: int
  compilation_cache_dir: str


@dataclasses.dataclass(frozen=True)
class OutputSpec:
  """How scoring, export and the report read the finished network."""

  magnitude_prune_pattern: str
  magnitude_prune_fraction: float
  score_image_size: int


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """A parsed, checked run: what `parse` returns.

  Attributes:
    data: the dataset and its pipeline settings.
    model: the network and where its variables come from.
    method: the compression method's registry name (`'ec2t'`, `'absmean'`, ...).
    stages: the configured stages in order (`schedule.StageSpec`).
    checkpoints: checkpoint and logging cadence.
    runtime: seed, devices, processes, compilation cache.
    output: how the finished network is read by the tools.
    config: the config it was parsed from (written to `config.json`, and
      compared on resume).
  """

  data: DataSpec
  model: ModelSpec
  method: str
  stages: tuple[schedule_lib.StageSpec, ...]
  checkpoints: CheckpointSpec
  runtime: RuntimeSpec
  output: OutputSpec
  config: Any = dataclasses.field(repr=False, compare=False)


def missing_init_from(config: Mapping[str, Any], specs=None) -> str | None:
  """The error of a recipe that needs `config.init_from` and has none, else None.

  A run with no full-precision stage and no `init_from` compresses a randomly
  initialised network: refused when `config.needs_init_from` is set (the
  ImageNet recipes), else a warning.
  """
  specs = schedule_lib.stage_specs(config) if specs is None else specs
  starts_fp = next((s.kind for s in specs if s.num_epochs), None) == schedule_lib.FP
  if starts_fp or config.get('init_from'):
    return None
  if config.get('needs_init_from'):
    return (
      'this recipe compresses a pretrained network (it has no full-precision stage) but '
      'config.init_from is empty: give --config.init_from=/path/weights (.pth/.pt or an '
      'orbax directory), or --config.needs_init_from=False to compress a randomly '
      'initialised network'
    )
  logging.warning('no full-precision stage and no config.init_from: EC2T starts from random init.')
  return None


def _number(value: Any) -> bool:
  return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


class _Problems:
  """Collects the problems of one `parse` pass; `check` runs a validator that raises."""

  def __init__(self):
    self.messages: list[str] = []

  def add(self, message: str) -> None:
    self.messages.append(' '.join(str(message).split()))

  def check(self, validator: Callable[[], Any]) -> Any:
    """`validator()`, or None after recording its ValueError/TypeError/FileNotFoundError.

    A dataset that is not prepared (`datasets.DatasetNotPreparedError`) is not a
    problem of the config: it propagates.
    """
    from ec2t_jax.training import datasets  # Local: it imports tfds lazily, grain.

    try:
      return validator()
    except datasets.DatasetNotPreparedError:
      raise
    except ConfigError as e:
      self.messages.extend(e.problems)
    except (ValueError, TypeError, FileNotFoundError) as e:
      self.add(str(e))
    return None


def _check_settings(config: Mapping[str, Any], problems: _Problems) -> None:
  """Field-by-field checks of numbers and patterns (no model, no data)."""
  for name in _POSITIVE:
    value = config.get(name)
    if value is not None and (not _number(value) or value <= 0):
      problems.add(f'config.{name} must be > 0, got {value!r}')
  max_to_keep = config.get('max_to_keep', 3)
  if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
    problems.add(
      f'config.max_to_keep must be an integer >= 1 (how many checkpoints stay on disk; a '
      f'stopped run resumes from the newest), got {max_to_keep!r}'
    )
  for name, meaning in _LIMITS.items():
    value = config.get(name)
    if value is not None and (isinstance(value, bool) or value < 0):
      problems.add(f'config.{name} must be >= 0 ({meaning}), got {value!r}')
  seed = config.get('seed', 0)
  if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
    problems.add(f'config.seed must be an integer in [0, 2**31), got {seed!r}')
  ec2t_cfg = config.get('ec2t') or {}
  for name in _FINITE_EC2T:
    value = ec2t_cfg.get(name)
    if _number(value) and not np.isfinite(value):
      problems.add(f'config.ec2t.{name} must be a finite number, got {value}')
  for name in _PATTERNS:
    _check_pattern(f'config.ec2t.{name}', ec2t_cfg.get(name), problems)
  for stage in ('fp', 'ec2t'):
    group = config.get(stage) or {}
    for key in ('num_epochs', 'frozen_epochs'):
      value = group.get(key)
      if value is not None and value < 0:
        problems.add(f'config.{stage}.{key} must be >= 0, got {value}')
    for key in ('learning_rate', 'latent_learning_rate', 'centroid_learning_rate'):
      value = group.get(key)
      if value is not None and value <= 0:
        problems.add(f'config.{stage}.{key} must be > 0, got {value}')
  prune = config.get('magnitude_prune') or {}
  fraction = prune.get('fraction', 0.0)
  if not _number(fraction) or not 0.0 <= fraction < 1.0:
    problems.add(
      f'config.magnitude_prune.fraction must be in [0, 1) (a fraction of each matching '
      f"layer's largest magnitude; 0 = none), got {fraction!r}"
    )
  _check_pattern('config.magnitude_prune.pattern', prune.get('pattern'), problems)


def _check_pattern(name: str, pattern: Any, problems: _Problems) -> None:
  if not pattern:
    return
  if not isinstance(pattern, str):
    problems.add(f'{name} must be a regular expression string, got {pattern!r}')
    return
  try:
    re.compile(pattern)
  except re.error as e:
    problems.add(
      f'{name}={pattern!r} is not a valid regular expression ({e}); it is matched against '
      "leaf paths like 'conv1/kernel'"
    )


def _check_stages(config, specs, problems: _Problems) -> None:
  """Checks that need the stages: best-checkpoint starts, something to train."""
  best = next((s.name for s in specs if s.start_from == schedule_lib.BEST), None)
  if best is not None and config.get('validation_size') == 0:
    problems.add(
      f"stage {best!r} starts from the best-by-validation checkpoint (start_from='best') but "
      'config.validation_size=0 holds out no validation data; set config.validation_size > 0 '
      "(or -1 for the dataset's default), or start_from='last'"
    )
  if specs and not any(s.num_epochs for s in specs):
    problems.add(
      'every stage has 0 epochs, so the run would train nothing: give a stage epochs '
      '(e.g. --config.ec2t.num_epochs=1)'
    )


def _check_devices(config, problems: _Problems) -> None:
  import jax  # Local: parsing without data or devices needs no backend.

  n = config.get('num_devices') or jax.device_count()
  batch_size = config.get('batch_size')
  if _number(batch_size) and batch_size > 0 and batch_size % n:
    problems.add(f'config.batch_size={batch_size} must be divisible by the {n} devices')


def _check_model_output(config, num_classes: int, image_shape, problems: _Problems) -> None:
  """The model's logits must have `num_classes` entries (traced with `jax.eval_shape`)."""
  import jax
  import jax.numpy as jnp

  from ec2t_jax.training import variables as variables_lib  # Local: it imports flax.

  model = problems.check(lambda: variables_lib.create_model(config, num_classes))
  if model is None:
    return
  if not hasattr(model, 'init'):
    problems.add(
      f'config.model={config.model!r} built a {type(model).__name__}, not a flax.linen '
      'Module: its factory must return a Module (models.register(name, factory))'
    )
    return

  def output():
    x = jnp.zeros((1, *image_shape), jnp.float32)
    rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(0)}
    return model.init_with_output(rngs, x, train=False)

  try:
    logits, variables = jax.eval_shape(output)
  except Exception as e:  # noqa: BLE001  (any failure to trace the model on this input)
    detail = ' '.join(str(e).split())[:300]
    problems.add(
      f'config.model={config.model!r} cannot run on images of shape {tuple(image_shape)} '
      f'({type(e).__name__}: {detail}); check config.model_kwargs, config.image_size or the '
      'dataset'
    )
    return
  shape = getattr(logits, 'shape', None)
  if shape is None or len(shape) != 2 or shape[-1] != num_classes:
    problems.add(
      f'config.model={config.model!r} returns outputs of shape {shape} for a batch of 1, '
      f'but the run has {num_classes} classes: the model must return (batch, {num_classes}) '
      'logits'
    )
  bad = [
    '/'.join(str(getattr(k, 'key', k)) for k in path)
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables.get('params', {}))
    if not jnp.issubdtype(leaf.dtype, jnp.floating)
  ]
  if bad:
    problems.add(
      f'config.model={config.model!r} has params that are not floating point ({", ".join(bad[:3])}'
      f'); gradients need float params: keep integer state in another collection than '
      "'params'"
    )


def parse(config: Any, *, check_data: bool = True, check_init_from: bool = True) -> RunSpec:
  """Reads and checks `config` once, and returns its `RunSpec`.

  Args:
    config: a run's `ml_collections.ConfigDict` (see `configs/default.py`).
    check_data: also open the dataset's metadata (classes, image shape) and
      trace the model's output shape; False for checks without data.
    check_init_from: refuse a recipe that needs `config.init_from` and has
      none (`missing_init_from`).

  Returns:
    The run's `RunSpec`.

  Raises:
    ConfigError: a ValueError listing every problem found, each naming the
      field, its value and what would be valid.
    datasets.DatasetNotPreparedError: a tfds dataset that is not prepared yet
      (other problems found are added to its message).
  """
  from ec2t_jax import models  # Local: it imports flax.
  from ec2t_jax.training import datasets
  from ec2t_jax.training import state as state_lib

  problems = _Problems()
  model_ok = problems.check(lambda: models.check_name(config.model) or True)
  not_prepared = None
  try:
    data_spec = problems.check(lambda: datasets.spec_for_config(config))
  except datasets.DatasetNotPreparedError as e:  # Said with the other problems, below.
    data_spec, not_prepared = None, e
  _check_settings(config, problems)
  method = problems.check(lambda: state_lib.check_method(config))
  specs = problems.check(lambda: schedule_lib.stage_specs(config))
  if specs is not None:
    _check_stages(config, specs, problems)
    if check_init_from:
      message = missing_init_from(config, specs)
      if message:
        problems.add(message)
  _check_devices(config, problems)
  grow = config.get('grow') or {}
  if grow.get('base_model'):
    from ec2t_jax.training import pretrained  # Local: only runs that grow a base need it.

    problems.check(lambda: pretrained.validate_grow_config(config))

  num_classes, image_shape = 0, ()
  if check_data and data_spec is not None:
    try:
      if data_spec.tfds_name and not data_spec.embedded:  # Prepared? (opens no records)
        datasets.get_data_source(
          data_spec, 'train', data_dir=config.get('data_dir') or None, in_memory=False
        )
      num_classes, image_shape = datasets.classes_and_shape(config)
    except datasets.DatasetNotPreparedError as e:
      not_prepared = e
    except (ValueError, TypeError, FileNotFoundError) as e:
      problems.add(str(e))
    if not_prepared is None and num_classes:
      known = getattr(data_spec, 'num_classes', None)
      if config.get('num_classes') and known and config.num_classes != known:
        problems.add(
          f'config.num_classes={config.num_classes} but dataset {data_spec.name!r} has '
          f"{known} classes: leave it 0 (the dataset's) or set {known}"
        )
      elif model_ok and not problems.messages:
        _check_model_output(config, num_classes, image_shape, problems)
  if not_prepared is not None:
    extra = ' '.join(f'Also, {p.rstrip(".")}.' for p in problems.messages)
    raise type(not_prepared)(f'{not_prepared} {extra}'.strip()) from not_prepared
  if problems.messages:
    raise ConfigError(problems.messages)
  return _build(config, method, specs, num_classes, image_shape)


def _build(config, method, specs, num_classes, image_shape) -> RunSpec:
  """The `RunSpec` of a config that passed every check."""
  grow = config.get('grow') or {}
  prune = config.get('magnitude_prune') or {}
  return RunSpec(
    data=DataSpec(
      name=config.dataset,
      data_dir=config.get('data_dir') or '',
      num_classes=int(num_classes),
      image_shape=tuple(int(d) for d in image_shape),
      image_size=int(config.get('image_size') or 0),
      normalization=config.get('normalization') or '',
      eval_crop_fraction=float(config.get('eval_crop_fraction') or 0.0),
      eval_resize_method=config.get('eval_resize_method') or '',
      eval_image_size=int(config.get('eval_image_size') or 0),
      validation_size=int(config.get('validation_size', -1)),
      num_train_examples=int(config.get('num_train_examples') or 0),
      num_eval_examples=int(config.get('num_eval_examples') or 0),
      steps_per_epoch=int(config.get('steps_per_epoch') or 0),
      in_memory=bool(config.get('in_memory', True)),
      worker_count=int(config.get('worker_count') or 0),
      batch_size=int(config.batch_size),
      eval_batch_size=int(config.get('eval_batch_size') or config.batch_size),
    ),
    model=ModelSpec(
      name=config.model,
      kwargs=dict(config.get('model_kwargs') or {}),
      half_precision=bool(config.get('half_precision')),
      init_from=config.get('init_from') or '',
      needs_init_from=bool(config.get('needs_init_from')),
      grow_base_model=grow.get('base_model') or '',
      grow_base_model_kwargs=dict(grow.get('base_model_kwargs') or {}),
      grow_split=grow.get('split') or 'equal',
      grow_seed=int(grow.get('seed') or 0),
    ),
    method=method,
    stages=tuple(specs),
    checkpoints=CheckpointSpec(
      log_every_steps=int(config.log_every_steps),
      checkpoint_every_steps=int(config.checkpoint_every_steps),
      max_to_keep=int(config.get('max_to_keep', 3)),
      overwrite=bool(config.get('overwrite')),
    ),
    runtime=RuntimeSpec(
      seed=int(config.get('seed', 0)),
      skip_nonfinite=bool(config.get('skip_nonfinite')),
      num_devices=int(config.get('num_devices') or 0),
      distributed=bool(config.get('distributed')),
      coordinator_address=config.get('coordinator_address') or '',
      num_processes=int(config.get('num_processes') or 0),
      process_id=int(config.get('process_id', -1)),
      compilation_cache_dir=config.get('compilation_cache_dir', '') or '',
    ),
    output=OutputSpec(
      magnitude_prune_pattern=prune.get('pattern') or '',
      magnitude_prune_fraction=float(prune.get('fraction') or 0.0),
      score_image_size=int(config.get('score_image_size') or 0),
    ),
    config=config,
  )
