"""What a run is, as values: the frozen dataclasses `ec2t_jax.training.parse.parse` returns.

`RunSpec` groups the run's data (`DataSpec`), network (`ModelSpec`), stages
(`schedule.StageSpec`, each with its `FpSettings` or `CompressionSettings`),
checkpoint cadence (`CheckpointSpec`), runtime (`RuntimeSpec`) and what the
tools read (`OutputSpec`). Everything below the config reader takes these
values; none of it reads the `ml_collections.ConfigDict`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ec2t_jax.training.schedule import StageSpec

__all__ = [
  'STAGE_SETTINGS',
  'DistillSpec',
  'CheckpointSpec',
  'CompressionSettings',
  'ConfigError',
  'DataSpec',
  'FpSettings',
  'ModelSpec',
  'OutputSpec',
  'RunSpec',
  'RuntimeSpec',
]


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
class FpSettings:
  """What a full-precision stage trains with (`config.fp`, updated by the stage's fields)."""

  optimizer: str
  learning_rate: float
  schedule: str
  momentum: float
  nesterov: bool
  weight_decay: float
  fixed_pattern: str = ''
  distill_weight: float = 0.0
  distill_temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class CompressionSettings:
  """What an EC2T or ECP stage trains with (`config.ec2t`, updated by the stage's fields).

  The baselines (`config.method`) use the learning rates, weight decay and the
  leaf selection; the EC2T settings (γ, s, ...) are EC2T's.
  """

  gamma: float
  init_scale: float
  sustain: float
  p0_min: float
  centroid_floor_std: float
  latent_learning_rate: float
  centroid_learning_rate: float
  learning_rate: float
  weight_decay: float
  reference_parity: bool
  keep_first: bool
  keep_last: bool
  keep_pattern: str
  ternary_pattern: str
  ternary_exclude: str
  prune_pattern: str
  fixed_pattern: str = ''
  distill_weight: float = 0.0
  distill_temperature: float = 1.0


STAGE_SETTINGS: dict[str, type] = {'fp': FpSettings, 'ec2t': CompressionSettings}
"""The typed settings of each config section a stage kind trains with (`StageKind.settings`)."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """The data of a run: which dataset, how it is split, batched and preprocessed.

  `source` is the dataset's `datasets.DatasetSpec` (None when parsed without
  data). `num_classes` and `image_shape` are resolved: the config's where it
  sets them, else the dataset's metadata.
  """

  name: str
  source: Any
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
  """Seed, devices, processes, the compilation cache, the NaN policy, steps per call."""

  seed: int
  skip_nonfinite: bool
  num_devices: int
  distributed: bool
  coordinator_address: str
  num_processes: int
  process_id: int
  compilation_cache_dir: str
  steps_per_call: int = 1


@dataclasses.dataclass(frozen=True)
class OutputSpec:
  """How scoring, export and the report read the finished network."""

  magnitude_prune_pattern: str
  magnitude_prune_fraction: float
  score_image_size: int


@dataclasses.dataclass(frozen=True)
class DistillSpec:
  """Distillation from a teacher (`config.distill`); each stage's is `StageSpec.distillation`.

  Attributes:
    teacher: `''` (none), `'fp'` (the run's own full-precision network), or a
      path (a workdir, an orbax variables directory, a `.pt`/`.pth` file).
    temperature: the softmax temperature T of the stages that do not set their own.
    weight: the weight w of the soft term for the stages that distill and do
      not set their own `distill_weight`.
    stages: the names of the stages that distill (`()`: every compressing
      stage, a frozen stage as the stage it continues).
  """

  teacher: str = ''
  temperature: float = 1.0
  weight: float = 0.0
  stages: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """A parsed, checked run: what `parse` returns.

  Attributes:
    data: the dataset and its pipeline settings.
    model: the network and where its variables come from.
    method: the compression method's registry name (`'ec2t'`, `'absmean'`, ...).
    stages: the configured stages in order (`schedule.StageSpec`, each with its
      typed settings).
    ec2t: `config.ec2t` as settings (what a run without compression stages
      would compress with; its masks describe such a run).
    checkpoints: checkpoint and logging cadence.
    runtime: seed, devices, processes, compilation cache.
    output: how the finished network is read by the tools.
    named_stages: the stages come from `config.stages` (errors name them).
    distill: the teacher of a distilled run (`config.distill`).
    config: the config it was parsed from (written to `config.json`, and
      compared on resume).
  """

  data: DataSpec
  model: ModelSpec
  method: str
  stages: tuple[StageSpec, ...]
  ec2t: CompressionSettings
  checkpoints: CheckpointSpec
  runtime: RuntimeSpec
  output: OutputSpec
  named_stages: bool
  config: Any = dataclasses.field(repr=False, compare=False)
  distill: DistillSpec = DistillSpec()

  @property
  def distills(self) -> bool:
    """True if any stage trains with a teacher (a `distill_weight` > 0)."""
    return any(s.distillation[0] > 0 for s in self.stages)
