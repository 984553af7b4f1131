"""Entropy coding of the ternary symbols: counts, ``N·H(P)`` bounds, the range coder's model.

A ternary leaf's symbols ``-w_n, 0, +w_p`` go through one `constriction` range coder, each
leaf with its own categorical model built from its exact symbol counts (`ec2t_jax.export`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

from ec2t_jax import ternary
from ec2t_jax.export_leaves import _named_arrays, ternary_leaves

__all__ = ['entropy_bound_bits']


def _symbol_counts(values: np.ndarray) -> list[int]:
  """``[#(w < 0), #(w == 0), #(w > 0)]``: a ternary leaf's symbols -w_n, 0, +w_p."""
  return [int(np.sum(values < 0)), int(np.sum(values == 0)), int(np.sum(values > 0))]


def _entropy_bits(counts: Sequence[int]) -> float:
  """``N·H(P)`` in bits of a leaf with these symbol counts (`ternary.entropy_bits` of ``P``)."""
  n = sum(counts)
  with jax.enable_x64(True):  # In float32, N·H(P) of a large layer would be off by bits.
    return n * float(ternary.entropy_bits(np.asarray(counts, np.float64) / n))


def entropy_bound_bits(variables: Any, opt_state: optax.OptState | None = None) -> float:
  """``Σ_l N_l·H(P_l)`` in bits over the ternary leaves (the entropy-coding target)."""
  flat = dict(_named_arrays(variables))
  tern = sorted(ternary_leaves(variables, opt_state))
  return float(sum(_entropy_bits(_symbol_counts(flat[name])) for name in tern))


def _constriction():
  try:
    import constriction
  except ImportError as e:  # pragma: no cover - a dependency of the package.
    raise ImportError(
      'entropy coding needs the `constriction` package: pip install constriction'
    ) from e
  return constriction


def _categorical(counts: Sequence[int]):
  """The coder's model of one leaf: its empirical symbol frequencies."""
  c = _constriction()
  p = np.asarray(counts, np.float64)
  return c.stream.model.Categorical(p / p.sum(), perfect=False)
