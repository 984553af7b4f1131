"""The schedule of a run: its stages and the steps each one spans, computed once.

A run is a sequence of stages over one global step counter. Each stage has a
kind (`ec2t_jax.training.stages`: `'fp'`, `'ec2t'`, `'frozen'`, `'ecp'`), a
number of epochs, and where it starts from.

Stages that train with one optimizer form a *pass* (`Stage.pass_index`): a
stage whose kind opens a pass (`fp`, `ec2t`, `ecp`) starts fresh optimizer
state, a stage whose kind joins the one before (`frozen`) continues it. A
stage starts from the previous stage's last step (`start_from='last'`) or
from the best-by-validation checkpoint of the pass so far (`'best'`). Leaves
that an earlier pass compressed are held fixed in later passes unless a later
pass selects them.

Without `config.stages` a run is three stages, full precision → EC2T →
frozen, from `config.fp.num_epochs`, `config.ec2t.num_epochs` and
`config.ec2t.frozen_epochs`. With it, `config.stages` names the stages and
`config.stage_order` orders them:

    config.stages.ternarize = ConfigDict(dict(kind='ec2t', num_epochs=20, gamma=0.125))
    config.stages.frozen = ConfigDict(dict(kind='frozen', num_epochs=15, start_from='best'))
    config.stage_order = 'ternarize,frozen'

A stage may set any field of the config section its kind trains with
(`config.ec2t` for `ec2t`/`ecp`: `gamma`, `init_scale`, `ternary_pattern`,
`prune_pattern`, learning rates, ...; `config.fp` for `fp`), plus
`fixed_pattern` (a regex of leaves held fixed); what it does not set comes
from that section.

The stages are read from the config by `ec2t_jax.training.parse.parse`
(`RunSpec.stages`); this module turns them into steps.

Example:
  >>> from ec2t_jax.training.stages import EC2T, FP, FROZEN
  >>> stages = (StageSpec('fp', FP, 1), StageSpec('ec2t', EC2T, 2), StageSpec('frozen', FROZEN, 1))
  >>> schedule = create_schedule(stages, steps_per_epoch=10)
  >>> [(s.kind, s.start, s.end, s.pass_index) for s in schedule.stages]
  [('fp', 0, 10, 0), ('ec2t', 10, 30, 1), ('frozen', 30, 40, 1)]
  >>> schedule.stage_at(29).kind, schedule.total_steps
  ('ec2t', 40)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from ec2t_jax.training import stages as stages_lib
from ec2t_jax.training.stages import LAST

__all__ = ['Schedule', 'Stage', 'StageSpec', 'create_schedule']


class Stage(NamedTuple):
  """One stage of a run: steps `[start, end)` of the global step counter.

  Attributes:
    kind: a stage kind's name (`ec2t_jax.training.stages.KINDS`).
    start: the first step of the stage.
    num_steps: how many steps it lasts (0 for a stage that is configured off).
    name: the stage's name in `config.stages` (the kind for the default sequence).
    pass_index: the pass it belongs to: stages of one pass share one optimizer state.
    start_from: `'last'` (the previous stage's last step) or `'best'` (the
      best-by-validation checkpoint of the run so far).
  """

  kind: str
  start: int
  num_steps: int
  name: str = ''
  pass_index: int = 0
  start_from: str = LAST

  @property
  def end(self) -> int:
    """The step after the stage's last step."""
    return self.start + self.num_steps

  @property
  def label(self) -> str:
    """The stage's name, or its kind when it has none."""
    return self.name or self.kind

  @property
  def kind_info(self) -> stages_lib.StageKind:
    """What a stage of this kind does (`ec2t_jax.training.stages.StageKind`)."""
    return stages_lib.get(self.kind)


class Schedule(NamedTuple):
  """The stages of a run and the steps per epoch they were computed from.

  Attributes:
    steps_per_epoch: optimization steps per epoch (every stage uses the same).
    stages: the stages in order, configured-off ones included with 0 steps.
  """

  steps_per_epoch: int
  stages: tuple[Stage, ...]

  @property
  def total_steps(self) -> int:
    """Steps of the whole run."""
    return self.stages[-1].end if self.stages else 0

  @property
  def num_passes(self) -> int:
    """How many passes (optimizer states) the run has."""
    return max((s.pass_index for s in self.stages), default=-1) + 1

  def stage(self, kind: str) -> Stage:
    """The first stage of `kind` (`ValueError` naming the kinds present if there is none)."""
    for s in self.stages:
      if s.kind == kind:
        return s
    raise ValueError(f'no stage of kind {kind!r}; stages: {[s.kind for s in self.stages]}')

  def stage_at(self, step: int) -> Stage:
    """The stage that step `step` (0-based, the step about to be taken) belongs to.

    A step at or past the end belongs to the last stage with any steps.
    """
    for s in self.stages:
      if s.start <= step < s.end:
        return s
    running = [s for s in self.stages if s.num_steps] or list(self.stages)
    return running[-1] if step >= self.total_steps else running[0]

  def pass_at(self, step: int) -> int:
    """The pass (`Stage.pass_index`) whose optimizer state a checkpoint of step `step` holds.

    A checkpoint at a stage boundary holds the state of the stage that starts there.
    """
    return self.stage_at(step).pass_index

  def pass_stages(self, pass_index: int) -> list[Stage]:
    """The stages of pass `pass_index`, in order."""
    return [s for s in self.stages if s.pass_index == pass_index]

  def pass_start(self, pass_index: int) -> int:
    """The first step of pass `pass_index`."""
    return self.pass_stages(pass_index)[0].start

  def freeze_step(self, pass_index: int) -> int:
    """The update of pass `pass_index`'s optimizer at which its assignment freezes.

    The steps of the pass's first stage: a stage that joins it (a frozen stage)
    starts there. (Passes no stage joins never reach it.)
    """
    return self.pass_stages(pass_index)[0].num_steps

  @property
  def compression_start(self) -> int:
    """The first step of the first compressing stage (the total steps if there is none)."""
    return next((s.start for s in self.stages if s.kind_info.compresses), self.total_steps)

  def compressed_at(self, step: int) -> bool:
    """Whether a checkpoint of `step` holds a compressed network (a compressing pass began)."""
    pass_index = self.pass_at(step)
    return any(s.kind_info.compresses and s.pass_index <= pass_index for s in self.stages)

  def transition_at(self, step: int) -> Stage | None:
    """The stage with steps that starts at `step` > 0 after another stage ran, else None."""
    if step <= 0 or step >= self.total_steps:
      return None
    current = self.stage_at(step)
    return current if current.start == step and self.stage_at(step - 1) != current else None

  def is_boundary(self, step: int) -> bool:
    """True if a stage with steps ends at `step` (those steps are always checkpointed)."""
    return any(s.num_steps and s.end == step for s in self.stages)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-friendly form (written to `summary.json` and read back by the report)."""
    return {
      'steps_per_epoch': self.steps_per_epoch,
      'stages': [s._asdict() for s in self.stages],
    }

  @classmethod
  def from_dict(cls, value: Mapping[str, Any]) -> Schedule:
    """The inverse of `to_dict`."""
    stages = tuple(
      Stage(
        str(s['kind']),
        int(s['start']),
        int(s['num_steps']),
        name=str(s['name']),
        pass_index=int(s['pass_index']),
        start_from=str(s['start_from']),
      )
      for s in value['stages']
    )
    return cls(int(value['steps_per_epoch']), stages)


class StageSpec(NamedTuple):
  """One configured stage before steps are known.

  Attributes:
    name: its name in `config.stages` (the kind for the default sequence).
    kind: a stage kind's name (`ec2t_jax.training.stages.KINDS`).
    num_epochs: how many epochs it lasts.
    start_from: `'last'` or `'best'`.
    settings: what the stage trains with: the config section of its kind
      (`config.fp` or `config.ec2t`) updated by the stage's own fields
      (`spec.FpSettings` / `spec.CompressionSettings`); None for a kind that
      continues the pass before it (frozen).
    distill: for a kind without settings (frozen), the `(weight, temperature)`
      of distillation in this stage; None where `settings` holds them.
  """

  name: str
  kind: str
  num_epochs: int
  start_from: str = LAST
  settings: Any = None
  distill: tuple[float, float] | None = None

  @property
  def distillation(self) -> tuple[float, float]:
    """`(weight, temperature)` of distillation in this stage (weight 0: it does not distill)."""
    if self.distill is not None:
      return self.distill
    if self.settings is not None:
      return (self.settings.distill_weight, self.settings.distill_temperature)
    return (0.0, 1.0)


def _pass_indices(kinds: Sequence[str]) -> list[int]:
  """The pass of each stage: a kind that opens a pass starts one, a joining kind continues."""
  indices, index = [], -1
  for kind in kinds:
    if stages_lib.get(kind).opens_pass or index < 0:
      index += 1
    indices.append(index)
  return indices


def create_schedule(stages: Sequence[StageSpec], steps_per_epoch: int) -> Schedule:
  """The schedule of a run's stages (see the module docstring) over one step counter.

  Args:
    stages: the run's configured stages in order (`RunSpec.stages`, from
      `ec2t_jax.training.spec.parse`).
    steps_per_epoch: steps per epoch, > 0.

  Returns:
    The `Schedule`.

  Raises:
    ValueError: for steps_per_epoch <= 0.
  """
  if steps_per_epoch <= 0:
    raise ValueError(f'steps_per_epoch must be > 0, got {steps_per_epoch}')
  indices = _pass_indices([s.kind for s in stages])
  out, start = [], 0
  for spec, pass_index in zip(stages, indices, strict=True):
    num_steps = int(spec.num_epochs) * steps_per_epoch
    out.append(Stage(spec.kind, start, num_steps, spec.name, pass_index, spec.start_from))
    start += num_steps
  return Schedule(steps_per_epoch, tuple(out))
