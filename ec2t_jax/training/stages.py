"""The kinds of training stage, each described once.

A run is a sequence of stages (`ec2t_jax.training.schedule`). What a stage of
each kind does is one `StageKind` here; the parser (which settings a stage may
set, which stage it must follow), the schedule (which stages share an
optimizer state), the set-up (which optimizer a pass gets), the trainer (what
it logs, evaluates and checkpoints) and the report ask the kind instead of
comparing names. The built-in kinds:

* `'fp'`: full-precision training with `config.fp`'s optimizer;
* `'ec2t'`: the compression method of `config.method` (EC2T by default,
  `docs/algorithm.md` §3–4): ternarizes its ternary leaves, prunes its prune
  leaves (ECP, §6), trains the rest in full precision;
* `'frozen'`: the assignment of the stage before it is held fixed (§5); it
  continues that stage's optimizer state;
* `'ecp'`: entropy-constrained pruning only (no ternary leaves).

Adding a kind is one `StageKind` in `KINDS` below (and, if it trains with
settings of its own, their fields in `ec2t_jax.training.spec`).

Example:
  >>> get('frozen').joins, get('ecp').ternarizes
  (('ec2t', 'ecp'), False)
  >>> get('fpp')
  Traceback (most recent call last):
  ...
  ValueError: stage kind 'fpp' is unknown; valid: 'fp', 'ec2t', 'frozen', 'ecp'
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = [
  'BEST',
  'EC2T',
  'ECP',
  'FP',
  'FROZEN',
  'KINDS',
  'LAST',
  'START_FROM',
  'StageKind',
  'get',
  'names',
]

FP, EC2T, FROZEN, ECP = 'fp', 'ec2t', 'frozen', 'ecp'
# Where a stage starts from: the previous stage's last step, or the best-by-validation
# checkpoint of the run so far.
LAST, BEST = 'last', 'best'
START_FROM = (LAST, BEST)


@dataclasses.dataclass(frozen=True)
class StageKind:
  """What a stage of one kind does.

  Attributes:
    name: the value of a stage's `kind` field.
    title: its name in the progress log (`'full precision'`, `'EC2T'`, ...).
    settings: the config group it trains with and whose fields a stage may
      override (`'fp'` or `'ec2t'`), or `''` for a kind that continues the
      optimizer of the stage before it.
    joins: the kinds it must follow; it continues their pass (optimizer state).
      Empty for a kind that opens a pass of its own.
    compresses: its steps train a compressed network (the method's optimizer,
      masks, EC2T statistics, best-by-validation checkpoints); False for full
      precision.
    ternarizes: a compressing kind selects ternary leaves (ECP prunes only).
    needs_prune_pattern: its settings must name the leaves it prunes.
    marker: the report's label for the step where it starts.
  """

  name: str
  title: str
  settings: str
  joins: tuple[str, ...] = ()
  compresses: bool = True
  ternarizes: bool = True
  needs_prune_pattern: bool = False
  marker: str = ''

  @property
  def opens_pass(self) -> bool:
    """True if a stage of this kind starts a new optimizer state."""
    return not self.joins


KINDS: dict[str, StageKind] = {
  kind.name: kind
  for kind in (
    StageKind(FP, 'full precision', 'fp', compresses=False, marker='full precision starts'),
    StageKind(EC2T, 'EC2T', 'ec2t', marker='EC2T starts'),
    StageKind(FROZEN, 'frozen-assignment', '', joins=(EC2T, ECP), marker='assignment frozen'),
    StageKind(ECP, 'ECP', 'ec2t', ternarizes=False, needs_prune_pattern=True, marker='ECP starts'),
  )
}
"""Every stage kind by name, in the order error messages list them."""


def get(name: object) -> StageKind:
  """The kind named `name`.

  Raises:
    ValueError: one line naming `name` and the valid kinds.
  """
  kind = KINDS.get(name) if isinstance(name, str) else None
  if kind is None:
    raise ValueError(f'stage kind {name!r} is unknown; valid: {", ".join(repr(k) for k in KINDS)}')
  return kind


def names(value: Any) -> list[str]:
  """Stage names given as a comma-separated string (`'fp,tern'`) or a sequence, as a list."""
  if isinstance(value, str):
    return [n.strip() for n in value.split(',') if n.strip()]
  return [str(n) for n in value]
