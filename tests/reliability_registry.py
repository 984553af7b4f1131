"""The registry of the reliability table's rows, shared by the modules that define them.

`tests/reliability_cases_test.py` owns the table (`test_case`, `test_table_is_current`,
the rendering into docs/reliability.md); `tests/reliability_cases_input.py` and
`tests/reliability_cases_resume.py` add rows to the same `CASES` with `case`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


class Case(NamedTuple):
  """One row of the table: its id, what was tried, the command, the answer now."""

  id: str
  tried: str
  command: str
  answer: str
  slow: bool = False


CASES: list[Case] = []
CHECKS: dict[str, Callable[..., None]] = {}


def case(case_id: str, tried: str, command: str, answer: str, *, slow: bool = False):
  """Registers the decorated check as the test of row `case_id`."""

  def register(check):
    assert case_id not in CHECKS, f'duplicate case id {case_id}'
    CASES.append(Case(case_id, tried, command, answer, slow))
    CHECKS[case_id] = check
    return check

  return register
