"""One reading of a run's config: `parse(config) -> RunSpec`, every check in one pass.

The `ml_collections.ConfigDict` is the user's format (recipes in `configs/`,
`--config.x=y` overrides). `parse` reads it once, checks every field it can
without training (names, ranges, patterns, stages, the method, the data's
classes and image shape from its metadata, the model's output shape by
`jax.eval_shape`) and reports **every** problem it finds in one error, before
the trainer touches the workdir. What it returns is a tree of frozen
dataclasses (`ec2t_jax.training.spec`) that the program below passes around
instead of the config. This module is the only one that reads config fields.

Example:
  >>> from ec2t_jax.configs import mnist
  >>> run = parse(mnist.get_config('smoke'))
  >>> run.model.name, run.data.num_classes, run.data.image_shape
  ('lenet5', 10, (28, 28, 1))
  >>> [s.kind for s in run.stages]
  ['fp', 'ec2t', 'frozen']
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

import ec2t_jax
from ec2t_jax import models
from ec2t_jax.configs import default as default_config
from ec2t_jax.training import datasets, pretrained
from ec2t_jax.training import stages as stages_lib
from ec2t_jax.training import variables as variables_lib
from ec2t_jax.training.schedule import StageSpec
from ec2t_jax.training.spec import (
  STAGE_SETTINGS,
  CheckpointSpec,
  ConfigError,
  DataSpec,
  DistillSpec,
  ModelSpec,
  OutputSpec,
  RunSpec,
  RuntimeSpec,
)
from ec2t_jax.training.stages import BEST, EC2T, FP, FROZEN, LAST, START_FROM

__all__ = [
  'DEFAULT_METHOD',
  'method_name',
  'missing_init_from',
  'model_spec',
  'parse',
  'runtime_spec',
  'stage_specs',
]

# The compression method of a config without `config.method`.
DEFAULT_METHOD = 'ec2t'


def method_name(config: Mapping[str, Any]) -> str:
  """`config.method` (`DEFAULT_METHOD` when a config has none), refused unless registered.

  Raises:
    ValueError: naming the method and the registered ones (`ec2t_jax.methods`).
  """
  return ec2t_jax.methods.get(config.get('method') or DEFAULT_METHOD, what='config.method').name


# Settings that are counts where 0 means "no limit" (negative ones are refused).
_LIMITS = {
  'steps_per_epoch': '0 = every batch of the training set',
  'num_eval_examples': '0 = the whole evaluation set',
  'num_train_examples': "0 = the source's size",
}


_POSITIVE = ('batch_size', 'eval_batch_size', 'log_every_steps', 'checkpoint_every_steps')


_FINITE_EC2T = ('gamma', 'init_scale', 'sustain', 'p0_min', 'centroid_floor_std')


_PATTERNS = ('ternary_pattern', 'ternary_exclude', 'keep_pattern', 'prune_pattern')


def _settings(kind: str, config: Mapping[str, Any], overrides: Mapping[str, Any], name: str = ''):
  """The typed settings of stage `name` of `kind`: defaults < its config section < the stage."""
  kind_info = stages_lib.get(kind)
  section = kind_info.settings  # 'fp' or 'ec2t'
  cls = STAGE_SETTINGS[section]
  names = {f.name for f in dataclasses.fields(cls)}
  defaults = default_config.get_config()[section]  # The one home of every default value.
  merged = {k: v for k, v in defaults.items() if k in names}
  merged.update({k: v for k, v in (config.get(section) or {}).items() if k in names})
  merged['distill_weight'], merged['distill_temperature'] = _distill_default(config, kind, name)
  merged.update({k: v for k, v in overrides.items() if k in names})
  merged = {k: ('' if v is None and k.endswith('pattern') else v) for k, v in merged.items()}
  return cls(**merged)


def missing_init_from(config: Mapping[str, Any], specs=None) -> str | None:
  """The error of a recipe that needs `config.init_from` and has none, else None.

  A run with no full-precision stage and no `init_from` compresses a randomly
  initialised network: refused when `config.needs_init_from` is set (the
  ImageNet recipes), else a warning.
  """
  specs = stage_specs(config) if specs is None else specs
  first = next((s.kind for s in specs if s.num_epochs), None)
  starts_fp = first is not None and not stages_lib.get(first).compresses
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
  per_call = config.get('steps_per_call', 1)
  if isinstance(per_call, bool) or not isinstance(per_call, int) or per_call < 1:
    problems.add(
      f'config.steps_per_call must be an integer >= 1 (training steps per compiled call; 1 = '
      f'one step per call), got {per_call!r}'
    )
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
  best = next((s.name for s in specs if s.start_from == BEST), None)
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


def parse(
  config: Any,
  *,
  check_data: bool = True,
  check_init_from: bool = True,
  check_devices: bool = True,
  check_model: bool = True,
) -> RunSpec:
  """Reads and checks `config` once, and returns its `RunSpec`.

  Args:
    config: a run's `ml_collections.ConfigDict` (see `configs/default.py`).
    check_data: also open the dataset's metadata (classes, image shape) and
      trace the model's output shape; False for checks without data.
    check_init_from: refuse a recipe that needs `config.init_from` and has
      none (`missing_init_from`).
    check_devices: refuse a batch size the devices of this process cannot
      share (False when a finished run is read back, e.g. on another machine).
    check_model: with `check_data`, trace the model on the data's image shape
      and check its outputs (False for tests of the data alone).

  Returns:
    The run's `RunSpec`.

  Raises:
    ConfigError: a ValueError listing every problem found, each naming the
      field, its value and what would be valid.
    datasets.DatasetNotPreparedError: a tfds dataset that is not prepared yet
      (other problems found are added to its message).
  """
  problems = _Problems()
  model_ok = problems.check(lambda: models.check_name(config.model) or True)
  not_prepared = None
  try:
    data_spec = problems.check(lambda: datasets.spec_for_config(config))
  except datasets.DatasetNotPreparedError as e:  # Said with the other problems, below.
    data_spec, not_prepared = None, e
  _check_settings(config, problems)
  method = problems.check(lambda: method_name(config))
  specs = problems.check(lambda: stage_specs(config))
  if specs is not None:
    _check_stages(config, specs, problems)
    _check_distill(config, specs, problems)
    if check_init_from:
      message = missing_init_from(config, specs)
      if message:
        problems.add(message)
  if check_devices:
    _check_devices(config, problems)
  grow = config.get('grow') or {}
  if grow.get('base_model'):
    problems.check(
      lambda: pretrained.validate_grow(
        model_spec(config), num_classes=config.get('num_classes') or 10, seed=config.get('seed', 0)
      )
    )

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
      if config.get('num_classes') and known and config.num_classes < known:
        problems.add(
          f'config.num_classes={config.num_classes} is too small: dataset {data_spec.name!r} '
          f"has {known} classes; leave it 0 (the dataset's) or set >= {known}"
        )
      elif check_model and model_ok and not problems.messages:
        for problem in variables_lib.model_output_problems(
          model_spec(config), num_classes, image_shape
        ):
          problems.add(problem)
  if not_prepared is not None:
    extra = ' '.join(f'Also, {p.rstrip(".")}.' for p in problems.messages)
    raise type(not_prepared)(f'{not_prepared} {extra}'.strip()) from not_prepared
  if problems.messages:
    raise ConfigError(problems.messages)
  run = _build(config, method, specs, data_spec if check_data else None, num_classes, image_shape)
  if check_data and check_init_from and run.distills:
    from ec2t_jax.training import teacher  # Local: teacher reads workdirs, which parse.

    problems.check(lambda: teacher.check_source(run))
    if problems.messages:
      raise ConfigError(problems.messages)
  return run


def _distill_spec(config: Mapping[str, Any]) -> DistillSpec:
  """`config.distill` as a `DistillSpec` (defaults where a config has none)."""
  distill = config.get('distill') or {}
  return DistillSpec(
    teacher=str(distill.get('teacher') or ''),
    temperature=distill.get('temperature', 4.0),
    weight=distill.get('weight', 0.0),
    stages=tuple(stages_lib.names(distill.get('stages') or '')),
  )


def _distill_default(config: Mapping[str, Any], kind: str, name: str) -> tuple[float, float]:
  """`(weight, temperature)` of stage `name` before its own fields: `config.distill`'s.

  With a teacher, the stages `config.distill.stages` names distill (all
  compressing stages where it names none); without one, none does.
  """
  distill = _distill_spec(config)
  listed = name in distill.stages if distill.stages else stages_lib.get(kind).compresses
  return (distill.weight if distill.teacher and listed else 0.0), distill.temperature


def _joined_distill(config, name: str, fields: Mapping[str, Any], before) -> tuple[float, float]:
  """`(weight, temperature)` of a joining stage (frozen): its own fields, else, where
  `config.distill.stages` names stages, `_distill_default`, else the stage it continues."""
  if _distill_spec(config).stages or before is None:
    weight, temperature = _distill_default(config, FROZEN, name)
  else:
    weight, temperature = before.distillation
  return (
    float(fields.get('distill_weight', weight)),
    float(fields.get('distill_temperature', temperature)),
  )


def _check_distill(config: Mapping[str, Any], specs, problems: _Problems) -> None:
  """Distillation settings: ranges, a teacher where a stage distills, and when 'fp' exists."""
  from ec2t_jax.training.teacher import FP_TEACHER

  distill = _distill_spec(config)
  problems.check(lambda: ec2t_jax.distill.check_distillation(distill.temperature, distill.weight))
  unknown = sorted(set(distill.stages) - {s.name for s in specs})
  if unknown:
    problems.add(
      f'config.distill.stages names {unknown}, which are not stages of this run; valid: '
      f'{", ".join(s.name for s in specs)}'
    )
  distilling = []
  for spec in specs:
    weight, temperature = spec.distillation
    try:
      ec2t_jax.distill.check_distillation(temperature, weight)
    except ValueError as e:
      problems.add(f'config.stages.{spec.name}: {e}')
      continue
    if weight > 0 and spec.num_epochs:
      distilling.append(spec)
  if not distilling:
    return
  names = ', '.join(s.name for s in distilling)
  if not distill.teacher:
    problems.add(
      f'stage(s) {names} set distill_weight > 0 but config.distill.teacher is empty; set it '
      "to 'fp' (this run's full-precision network) or a path, or the weights to 0"
    )
    return
  if distill.teacher != FP_TEACHER:
    return
  first_fp = next(
    (i for i, s in enumerate(specs) if s.num_epochs and not stages_lib.get(s.kind).compresses),
    None,
  )
  for i, spec in enumerate(specs):
    if spec not in distilling:
      continue
    if first_fp is not None and i <= first_fp:
      problems.add(
        f"config.stages.{spec.name} distills from teacher='fp', which exists only when the "
        f'full-precision stage {specs[first_fp].name!r} ends; set its distill_weight to 0, '
        'or give config.distill.teacher a path'
      )
    elif first_fp is None and not (
      config.get('init_from') or (config.get('grow') or {}).get('base_model')
    ):
      problems.add(
        "config.distill.teacher='fp' but the run has no full-precision stage and no "
        'config.init_from: there is no full-precision network to learn from; train one first, '
        'or give config.distill.teacher a path'
      )
      return


def model_spec(config: Mapping[str, Any]) -> ModelSpec:
  """The `ModelSpec` of `config` (`model`, `model_kwargs`, `half_precision`, `init_from`, `grow`).

  `parse` uses it for the run's network; the growth of a pretrained base uses it
  for the base network's config.
  """
  grow = config.get('grow') or {}
  return ModelSpec(
    name=config.model,
    kwargs=dict(config.get('model_kwargs') or {}),
    half_precision=bool(config.get('half_precision')),
    init_from=config.get('init_from') or '',
    needs_init_from=bool(config.get('needs_init_from')),
    grow_base_model=grow.get('base_model') or '',
    grow_base_model_kwargs=dict(grow.get('base_model_kwargs') or {}),
    grow_split=grow.get('split') or 'equal',
    grow_seed=int(grow.get('seed') or 0),
  )


def runtime_spec(config: Mapping[str, Any]) -> RuntimeSpec:
  """The `RuntimeSpec` of `config`; read before `parse` to start multi-host JAX first."""
  process_id = config.get('process_id', -1)
  return RuntimeSpec(
    seed=int(config.get('seed', 0)),
    skip_nonfinite=bool(config.get('skip_nonfinite')),
    num_devices=int(config.get('num_devices') or 0),
    distributed=bool(config.get('distributed')),
    coordinator_address=config.get('coordinator_address') or '',
    num_processes=int(config.get('num_processes') or 0),
    process_id=int(-1 if process_id is None else process_id),
    compilation_cache_dir=config.get('compilation_cache_dir', '') or '',
    steps_per_call=int(config.get('steps_per_call') or 1),
  )


def _build(config, method, specs, source, num_classes, image_shape) -> RunSpec:
  """The `RunSpec` of a config that passed every check."""
  prune = config.get('magnitude_prune') or {}
  return RunSpec(
    data=DataSpec(
      name=config.dataset,
      source=source,
      data_dir=config.get('data_dir') or '',
      num_classes=int(num_classes),
      image_shape=tuple(int(d) for d in image_shape),
      image_size=int(config.get('image_size') or 0),
      normalization=config.get('normalization') or '',
      eval_crop_fraction=float(config.get('eval_crop_fraction') or 0.0),
      eval_resize_method=config.get('eval_resize_method') or '',
      eval_image_size=int(config.get('eval_image_size') or 0),
      validation_size=int(-1 if config.get('validation_size') is None else config.validation_size),
      num_train_examples=int(config.get('num_train_examples') or 0),
      num_eval_examples=int(config.get('num_eval_examples') or 0),
      steps_per_epoch=int(config.get('steps_per_epoch') or 0),
      in_memory=bool(config.get('in_memory', True)),
      worker_count=int(config.get('worker_count') or 0),
      batch_size=int(config.batch_size),
      eval_batch_size=int(config.get('eval_batch_size') or config.batch_size),
    ),
    model=model_spec(config),
    method=method,
    stages=tuple(specs),
    ec2t=_settings(EC2T, config, {}),
    checkpoints=CheckpointSpec(
      log_every_steps=int(config.log_every_steps),
      checkpoint_every_steps=int(config.checkpoint_every_steps),
      max_to_keep=int(config.get('max_to_keep', 3)),
      overwrite=bool(config.get('overwrite')),
    ),
    runtime=runtime_spec(config),
    output=OutputSpec(
      magnitude_prune_pattern=prune.get('pattern') or '',
      magnitude_prune_fraction=float(prune.get('fraction') or 0.0),
      score_image_size=int(config.get('score_image_size') or 0),
    ),
    named_stages=bool(config.get('stages')),
    config=config,
    distill=_distill_spec(config),
  )


# Stage fields besides the settings of `config.fp` / `config.ec2t`.
_STAGE_FIELDS = ('kind', 'num_epochs', 'start_from')


_DISTILL_SETTINGS = ('distill_weight', 'distill_temperature')
_EXTRA_SETTINGS = ('fixed_pattern', *_DISTILL_SETTINGS)


# Fields of a config section that are not per-stage settings (the default sequence's epochs).
_NOT_SETTINGS = {'ec2t': ('num_epochs', 'frozen_epochs', 'frozen_start_from')}


def _stage_order(config: Mapping[str, Any], names: Sequence[str]) -> list[str]:
  """The names of `config.stage_order` (a comma-separated string or a sequence), checked."""
  order = stages_lib.names(config.get('stage_order') or '')
  if not order:
    raise ValueError(
      f'config.stages defines {sorted(names)} but config.stage_order is empty; set it to the '
      f"stage names in the order they run, e.g. '{','.join(sorted(names))}'"
    )
  unknown = [n for n in order if n not in names]
  if unknown:
    raise ValueError(
      f'config.stage_order names {unknown} that config.stages does not define; defined: '
      f'{sorted(names)}'
    )
  unused = [n for n in names if n not in order]
  if unused:
    raise ValueError(
      f'config.stages defines {unused} but config.stage_order={",".join(order)!r} does not '
      'run them; add them to config.stage_order or remove them'
    )
  if len(set(order)) != len(order):
    raise ValueError(f'config.stage_order={",".join(order)!r} names a stage twice')
  return order


def _valid_settings(config: Mapping[str, Any], kind: str) -> list[str]:
  """The setting names a stage of `kind` may override (those of its config section)."""
  section = stages_lib.get(kind).settings
  if not section:  # A joining kind (frozen) trains with its pass's settings but may distill.
    return sorted(_DISTILL_SETTINGS)
  base = [k for k in (config.get(section) or {}) if k not in _NOT_SETTINGS.get(section, ())]
  return sorted([*base, *_EXTRA_SETTINGS])


def stage_specs(config: Mapping[str, Any]) -> tuple[StageSpec, ...]:
  """The configured stages of `config`, validated (no model or data needed).

  Args:
    config: the run's config; `config.stages` + `config.stage_order`, or
      without them the default sequence of `config.fp` and `config.ec2t`.

  Returns:
    One `StageSpec` per stage, in order.

  Raises:
    ValueError: one line naming the bad value: an unknown stage kind or
      setting, a negative number of epochs, a bad `start_from`, a frozen
      stage that does not follow an EC2T or ECP stage, or a `stage_order`
      that does not match `config.stages`.
  """
  stages = config.get('stages') or {}
  if not stages:
    fp, ec2t = config['fp'], config['ec2t']
    specs = (
      StageSpec(FP, FP, fp.get('num_epochs') or 0, LAST, _settings(FP, config, {}, FP)),
      StageSpec(EC2T, EC2T, ec2t.get('num_epochs') or 0, LAST, _settings(EC2T, config, {}, EC2T)),
    )
    frozen_from = ec2t.get('frozen_start_from') or LAST
    frozen = _joined_distill(config, FROZEN, {}, specs[1])
    specs += (StageSpec(FROZEN, FROZEN, ec2t.get('frozen_epochs') or 0, frozen_from, None, frozen),)
    for spec in specs:
      if spec.num_epochs < 0:
        raise ValueError(f'the {spec.kind} stage must last >= 0 epochs, got {spec.num_epochs}')
    if specs[2].start_from not in START_FROM:
      raise ValueError(
        f'config.ec2t.frozen_start_from={specs[2].start_from!r}; valid: '
        f'{", ".join(repr(s) for s in START_FROM)}'
      )
    _check_sequence(specs)
    return specs
  specs = []
  for name in _stage_order(config, list(stages.keys())):
    stage = stages[name]
    where = f'config.stages.{name}'
    if not (hasattr(stage, 'get') and hasattr(stage, 'items')):  # A dict or a ConfigDict.
      raise ValueError(f'{where} must be a ConfigDict of stage fields, got {stage!r}')
    kind = stage.get('kind')
    if kind not in stages_lib.KINDS:
      raise ValueError(
        f'{where}.kind={kind!r} is not a stage kind; valid: {", ".join(stages_lib.KINDS)}'
      )
    epochs = stage.get('num_epochs')
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
      raise ValueError(f'{where}.num_epochs must be an integer >= 0, got {epochs!r}')
    start_from = stage.get('start_from') or LAST
    if start_from not in START_FROM:
      raise ValueError(
        f'{where}.start_from={start_from!r}; valid: {", ".join(repr(s) for s in START_FROM)}'
      )
    valid = _valid_settings(config, kind)
    settings = {k: v for k, v in stage.items() if k not in _STAGE_FIELDS}
    unknown = sorted(set(settings) - set(valid))
    if unknown:
      raise ValueError(
        f'{where} sets {unknown}, which a {kind!r} stage does not have; valid: '
        f'{", ".join([*_STAGE_FIELDS, *valid])}'
      )
    if stages_lib.get(kind).settings:
      specs.append(
        StageSpec(str(name), kind, epochs, start_from, _settings(kind, config, settings, str(name)))
      )
    else:
      before = specs[-1] if specs else None
      joined = _joined_distill(config, str(name), settings, before)
      specs.append(StageSpec(str(name), kind, epochs, start_from, None, joined))
  _check_sequence(specs)
  return tuple(specs)


def _check_sequence(specs: Sequence[StageSpec]) -> None:
  """Refuses a joining stage (frozen) after a kind it cannot join, and bad `start_from`s."""
  for i, spec in enumerate(specs):
    before = specs[i - 1] if i else None
    joins = stages_lib.get(spec.kind).joins
    if joins and (before is None or before.kind not in joins):
      raise ValueError(
        f'config.stages.{spec.name} is a {spec.kind} stage, which continues the '
        f'{" or ".join(joins)} stage right before it; it follows '
        f'{before.name if before else "nothing"!r}'
      )
    if spec.start_from == BEST and spec.num_epochs:
      if before is None:
        raise ValueError(
          f"config.stages.{spec.name}.start_from='best' but it is the first stage; nothing "
          "before it can be best: use 'last'"
        )
      compressed = [s for s in specs[:i] if stages_lib.get(s.kind).compresses and s.num_epochs]
      if not compressed:
        raise ValueError(
          f"stage {spec.name!r} has start_from='best' but no EC2T/ECP stage with epochs runs "
          'before it (best checkpoints are kept from the first compression stage on); use '
          "'last'"
        )
