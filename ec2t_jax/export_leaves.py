"""The leaves an export holds: a variables tree's arrays, and which of them are ternary.

`ternary_leaves` decides which leaves `ec2t_jax.export` packs as ternary (mask, signs and
two centroids) and which `ec2t_jax.onnx_export` stores as int8: both import it from here,
and this module imports neither of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax

from ec2t_jax import tree_util

__all__ = ['ternary_leaves']

# The leaf dtypes a file may hold (the writer refuses others; the reader accepts no others).
_LEAF_DTYPES = (
  'bool',
  'int8',
  'int16',
  'int32',
  'int64',
  'uint8',
  'uint16',
  'uint32',
  'uint64',
  'float16',
  'float32',
  'float64',
  'bfloat16',
)


def _check_variables(variables: Any) -> None:
  """Raises `ValueError` unless ``variables`` is a nested mapping with string keys."""
  if not isinstance(variables, Mapping):
    raise ValueError(
      f'variables must be a nested mapping like {{"params": ..., "batch_stats": ...}}, '
      f'got {type(variables).__name__}'
    )

  def walk(prefix, node):
    for key, value in node.items():
      if not isinstance(key, str):
        raise ValueError(f'variables keys must be strings, got {key!r} at {"/".join(prefix)}')
      if '/' in key:  # The manifest's paths are the '/'-separated leaf names.
        raise ValueError(f'variables keys must not contain "/", got {key!r}')
      if isinstance(value, Mapping):
        walk((*prefix, key), value)

  walk((), variables)


def _named_arrays(variables: Any) -> list[tuple[str, np.ndarray]]:
  """``[(leaf name, array)]`` of a nested mapping of arrays (`tree_util.named_leaves` order).

  Raises:
    ValueError: for a leaf whose dtype a file cannot hold (object, complex, strings).
  """
  _check_variables(variables)
  out = [
    (name, np.asarray(jax.device_get(value))) for name, value in tree_util.named_leaves(variables)
  ]
  for name, value in out:
    if str(value.dtype) not in _LEAF_DTYPES:
      raise ValueError(
        f'{name} has dtype {value.dtype}; an export holds {", ".join(_LEAF_DTYPES)} leaves'
      )
  return out


def _ternary_levels(values: np.ndarray) -> tuple[float, float] | None:
  """`tree_util.ternary_levels` of a leaf that can be packed bit-exactly, else None.

  Only float16/32/64 leaves qualify (bfloat16 ones are stored as full
  precision), and no value may be -0.0: the packed form brings every zero back
  as +0.0.
  """
  if values.dtype.kind != 'f' or np.any(np.signbit(values[values == 0])):
    return None
  return tree_util.ternary_levels(values)


def ternary_leaves(variables: Any, opt_state: optax.OptState | None = None) -> set[str]:
  """Paths (``'params/conv2/kernel'``) of the leaves `save` packs as ternary.

  With ``opt_state`` these are the leaves EC2T compresses
  (`ec2t_jax.compressed_kernels`) whose values are ternary (entropy-constrained
  pruned leaves are not); without it, every params leaf of two or more
  dimensions whose values are exactly ``{-a, 0, +b}``.
  """
  flat = _named_arrays(variables)
  if opt_state is not None:
    from ec2t_jax import state_utils

    params = variables['params'] if 'params' in variables else variables
    candidates = {f'params/{name}' for name in state_utils.compressed_kernels(opt_state, params)}
  else:
    candidates = {name for name, value in flat if name.startswith('params/') and value.ndim >= 2}
  return {name for name, value in flat if name in candidates and _ternary_levels(value) is not None}
