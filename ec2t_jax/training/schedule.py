"""The schedule of a run: its stages and the steps each one spans, computed once.

A run is a sequence of stages over one global step counter. Today's sequence is
full precision → EC2T → frozen assignment (`docs/algorithm.md` §5); each stage
lasts its configured epochs times the same steps per epoch. The trainer, the
resume logic, the workdir reader and the report all ask this one value which
stage a step belongs to, instead of recomputing the boundaries.

Example:
  >>> import ml_collections
  >>> config = ml_collections.ConfigDict(
  ...   {'fp': {'num_epochs': 1}, 'ec2t': {'num_epochs': 2, 'frozen_epochs': 1}})
  >>> schedule = create_schedule(config, steps_per_epoch=10)
  >>> [(s.kind, s.start, s.end) for s in schedule.stages]
  [('fp', 0, 10), ('ec2t', 10, 30), ('frozen', 30, 40)]
  >>> schedule.stage_at(29).kind, schedule.total_steps
  ('ec2t', 40)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = ['EC2T', 'FP', 'FROZEN', 'STAGE_KINDS', 'Schedule', 'Stage', 'create_schedule']

# Stage kinds. EC2T and FROZEN share one optimizer (`ec2t_jax.ec2t` freezes the
# assignment at the frozen stage's first step); FP has its own.
FP, EC2T, FROZEN = 'fp', 'ec2t', 'frozen'
STAGE_KINDS = (FP, EC2T, FROZEN)


class Stage(NamedTuple):
  """One stage of a run: steps `[start, end)` of the global step counter.

  Attributes:
    kind: one of `STAGE_KINDS`.
    start: the first step of the stage.
    num_steps: how many steps it lasts (0 for a stage that is configured off).
  """

  kind: str
  start: int
  num_steps: int

  @property
  def end(self) -> int:
    """The step after the stage's last step."""
    return self.start + self.num_steps

  @property
  def optimizer(self) -> str:
    """Which optimizer trains in this stage: `'fp'` or `'ec2t'` (EC2T and frozen share one)."""
    return FP if self.kind == FP else EC2T


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

  def stage(self, kind: str) -> Stage:
    """The stage of `kind` (`ValueError` naming the kinds present if there is none)."""
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

  def optimizer_at(self, step: int) -> str:
    """The optimizer whose state a checkpoint of step `step` holds: `'fp'` or `'ec2t'`.

    A checkpoint at a stage boundary holds the state of the stage that starts there.
    """
    return FP if step < self.stage(FP).end else EC2T

  def is_boundary(self, step: int) -> bool:
    """True if a stage with steps ends at `step` (those steps are always checkpointed)."""
    return any(s.num_steps and s.end == step for s in self.stages)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-friendly form (written to `summary.json` and read back by the report)."""
    return {
      'steps_per_epoch': self.steps_per_epoch,
      'stages': [{'kind': s.kind, 'start': s.start, 'num_steps': s.num_steps} for s in self.stages],
    }

  @classmethod
  def from_dict(cls, value: Mapping[str, Any]) -> Schedule:
    """The inverse of `to_dict`."""
    stages = tuple(
      Stage(str(s['kind']), int(s['start']), int(s['num_steps'])) for s in value['stages']
    )
    return cls(int(value['steps_per_epoch']), stages)


def create_schedule(config: Mapping[str, Any], steps_per_epoch: int) -> Schedule:
  """The schedule of `config`: `config.fp.num_epochs`, then EC2T and frozen epochs.

  Args:
    config: the run's config (`config.fp.num_epochs`, `config.ec2t.num_epochs`,
      `config.ec2t.frozen_epochs`; missing or None counts as 0).
    steps_per_epoch: steps per epoch, > 0.

  Returns:
    The `Schedule` with one stage of each kind in the order fp, ec2t, frozen.

  Raises:
    ValueError: for steps_per_epoch <= 0 or a negative number of epochs.
  """
  if steps_per_epoch <= 0:
    raise ValueError(f'steps_per_epoch must be > 0, got {steps_per_epoch}')
  epochs = {
    FP: config['fp'].get('num_epochs') or 0,
    EC2T: config['ec2t'].get('num_epochs') or 0,
    FROZEN: config['ec2t'].get('frozen_epochs') or 0,
  }
  stages, start = [], 0
  for kind in STAGE_KINDS:
    if epochs[kind] < 0:
      raise ValueError(f'the {kind} stage must last >= 0 epochs, got {epochs[kind]}')
    num_steps = int(epochs[kind]) * steps_per_epoch
    stages.append(Stage(kind, start, num_steps))
    start += num_steps
  return Schedule(steps_per_epoch, tuple(stages))
