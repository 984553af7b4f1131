"""The schedule of a run: its stages and the steps each one spans, computed once.

A run is a sequence of stages over one global step counter. Each stage has a
kind, a number of epochs, and where it starts from:

* `'fp'`: full-precision training with `config.fp`'s optimizer;
* `'ec2t'`: EC2T (`docs/algorithm.md` §3–4): ternarizes its ternary leaves,
  prunes its prune leaves (ECP, §6), trains the rest in full precision;
* `'frozen'`: the assignment of the stage before it is held fixed (§5); it
  continues that stage's optimizer;
* `'ecp'`: entropy-constrained pruning only (no ternary leaves).

Stages that train with one optimizer form a *pass* (`Stage.group`): every
`fp`, `ec2t` or `ecp` stage opens a new pass with fresh optimizer state, a
`frozen` stage joins the pass before it. A stage starts from the previous
stage's last step (`start_from='last'`) or from the best-by-validation
checkpoint of the pass so far (`'best'`). Leaves that an earlier pass
compressed are held fixed in later passes unless a later pass selects them.

Without `config.stages` a run is today's three stages, full precision →
EC2T → frozen, from `config.fp.num_epochs`, `config.ec2t.num_epochs` and
`config.ec2t.frozen_epochs`. With it, `config.stages` names the stages and
`config.stage_order` orders them:

    config.stages.ternarize = ConfigDict(dict(kind='ec2t', num_epochs=20, gamma=0.125))
    config.stages.frozen = ConfigDict(dict(kind='frozen', num_epochs=15, start_from='best'))
    config.stage_order = 'ternarize,frozen'

A stage may set any field of `config.ec2t` (an `ec2t`/`ecp` stage: `gamma`,
`init_scale`, `ternary_pattern`, `prune_pattern`, learning rates, ...) or of
`config.fp` (an `fp` stage), plus `fixed_pattern` (a regex of leaves held
fixed); what it does not set comes from `config.ec2t` / `config.fp`.

The stages are read from the config by `ec2t_jax.training.spec.parse`
(`RunSpec.stages`); this module turns them into steps.

Example:
  >>> stages = (StageSpec('fp', FP, 1), StageSpec('ec2t', EC2T, 2), StageSpec('frozen', FROZEN, 1))
  >>> schedule = create_schedule(stages, steps_per_epoch=10)
  >>> [(s.kind, s.start, s.end, s.group) for s in schedule.stages]
  [('fp', 0, 10, 0), ('ec2t', 10, 30, 1), ('frozen', 30, 40, 1)]
  >>> schedule.stage_at(29).kind, schedule.total_steps
  ('ec2t', 40)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

__all__ = [
  'BEST',
  'EC2T',
  'ECP',
  'FP',
  'FROZEN',
  'LAST',
  'STAGE_KINDS',
  'Schedule',
  'Stage',
  'StageSpec',
  'create_schedule',
]

# Stage kinds. A FROZEN stage continues the optimizer of the EC2T or ECP stage before
# it (`ec2t_jax.ec2t` freezes the assignment at the frozen stage's first step).
FP, EC2T, FROZEN, ECP = 'fp', 'ec2t', 'frozen', 'ecp'
STAGE_KINDS = (FP, EC2T, FROZEN, ECP)
# Where a stage starts from.
LAST, BEST = 'last', 'best'
START_FROM = (LAST, BEST)


class Stage(NamedTuple):
  """One stage of a run: steps `[start, end)` of the global step counter.

  Attributes:
    kind: one of `STAGE_KINDS`.
    start: the first step of the stage.
    num_steps: how many steps it lasts (0 for a stage that is configured off).
    name: the stage's name in `config.stages` (the kind for the default sequence).
    group: the pass it belongs to: stages of one pass share one optimizer state.
    start_from: `'last'` (the previous stage's last step) or `'best'` (the
      best-by-validation checkpoint of the run so far).
  """

  kind: str
  start: int
  num_steps: int
  name: str = ''
  group: int = 0
  start_from: str = LAST

  @property
  def end(self) -> int:
    """The step after the stage's last step."""
    return self.start + self.num_steps

  @property
  def label(self) -> str:
    """The stage's name, or its kind when it has none."""
    return self.name or self.kind


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
  def num_groups(self) -> int:
    """How many passes (optimizer states) the run has."""
    return max((s.group for s in self.stages), default=-1) + 1

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

  def optimizer_at(self, step: int) -> int:
    """The pass (`Stage.group`) whose optimizer state a checkpoint of step `step` holds.

    A checkpoint at a stage boundary holds the state of the stage that starts there.
    """
    return self.stage_at(step).group

  def group_stages(self, group: int) -> list[Stage]:
    """The stages of pass `group`, in order."""
    return [s for s in self.stages if s.group == group]

  def group_start(self, group: int) -> int:
    """The first step of pass `group`."""
    return self.group_stages(group)[0].start

  def freeze_step(self, group: int) -> int:
    """The update of pass `group`'s optimizer at which its assignment freezes.

    The steps of the pass's first (EC2T or ECP) stage: the frozen stage after it
    starts there. (Passes without a frozen stage never reach it.)
    """
    return self.group_stages(group)[0].num_steps

  @property
  def compression_start(self) -> int:
    """The first step of the first EC2T or ECP stage (the total steps if there is none)."""
    return next((s.start for s in self.stages if s.kind != FP), self.total_steps)

  def compressed_at(self, step: int) -> bool:
    """Whether a checkpoint of `step` holds a compressed network (a non-fp pass began)."""
    group = self.optimizer_at(step)
    return any(s.kind != FP and s.group <= group for s in self.stages)

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
    """The inverse of `to_dict` (also reads schedules written before stages had names)."""
    kinds = [str(s['kind']) for s in value['stages']]
    groups = _groups(kinds)
    stages = tuple(
      Stage(
        kind,
        int(s['start']),
        int(s['num_steps']),
        name=str(s.get('name', '') or kind),
        group=int(s.get('group', group)),
        start_from=str(s.get('start_from', LAST)),
      )
      for kind, group, s in zip(kinds, groups, value['stages'], strict=True)
    )
    return cls(int(value['steps_per_epoch']), stages)


class StageSpec(NamedTuple):
  """One configured stage before steps are known.

  Attributes:
    name: its name in `config.stages` (the kind for the default sequence).
    kind: one of `STAGE_KINDS`.
    num_epochs: how many epochs it lasts.
    start_from: `'last'` or `'best'`.
    settings: what the stage trains with: `config.fp` or `config.ec2t` updated by
      the stage's own fields (`spec.FpSettings` / `spec.CompressionSettings`);
      None for a frozen stage, which continues the pass before it.
  """

  name: str
  kind: str
  num_epochs: int
  start_from: str = LAST
  settings: Any = None


def _groups(kinds: Sequence[str]) -> list[int]:
  """The pass of each stage: FP, EC2T and ECP open one, FROZEN joins the one before."""
  groups, group = [], -1
  for kind in kinds:
    if kind != FROZEN or group < 0:
      group += 1
    groups.append(group)
  return groups


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
  groups = _groups([s.kind for s in stages])
  out, start = [], 0
  for spec, group in zip(stages, groups, strict=True):
    num_steps = int(spec.num_epochs) * steps_per_epoch
    out.append(Stage(spec.kind, start, num_steps, spec.name, group, spec.start_from))
    start += num_steps
  return Schedule(steps_per_epoch, tuple(out))
