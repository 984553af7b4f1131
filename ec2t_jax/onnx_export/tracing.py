"""The model traced at two batch sizes: symbolic batch dimensions, twin equations.

Every dimension that differs between the two traces is a multiple of the batch (`_Batch`),
and every equation must equal its twin in all but its shapes (`_check_twins`), so that
the one graph holds at any batch size.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

# Batch sizes of the two traces; any two distinct sizes work.
_TRACE_BATCHES = (2, 3)


class _Batch(NamedTuple):
  """A dimension of ``k`` times the batch size."""

  k: int


def _dims(a: Any, b: Any, batches: tuple[int, int]) -> tuple[int | _Batch, ...]:
  """The shape template of a variable from its avals in the two traces."""
  out = []
  for da, db in zip(a.shape, b.shape, strict=True):
    if da == db:
      out.append(int(da))
      continue
    k = da // batches[0]
    if k * batches[0] != da or k * batches[1] != db:
      raise NotImplementedError(
        f'a dimension is {da} at batch {batches[0]} and {db} at batch {batches[1]}: '
        'only multiples of the batch size can be exported'
      )
    out.append(_Batch(k))
  return tuple(out)


# Equation parameters that hold shapes or slice bounds, and so may carry the batch
# size: the translation reads them through the symbolic dims of `_dims` (or refuses
# a batch-dependent one, as `_Translator._slice_axes` does). Every other parameter
# must be equal in the two traces.
_SHAPE_PARAMS = frozenset({'shape', 'new_sizes', 'start_indices', 'limit_indices', 'slice_sizes'})
_DATA = (bool, int, float, complex, str, bytes, type(None), np.dtype, enum.Enum)


def _short(value: Any) -> str:
  """A value for an error message: ``2.0 (float32)``, or a few elements and the shape."""
  arr = np.asarray(value)
  if not arr.ndim:
    return f'{arr.item()!r} ({arr.dtype})'
  return f'{np.array2string(arr, threshold=6, precision=6)} ({arr.dtype}{list(arr.shape)})'


def _same(a: Any, b: Any) -> bool:
  """Whether two equation parameters of the twin traces are equal.

  Data (numbers, strings, dtypes, enums, arrays, and tuples of them such as
  dimension numbers) is compared; anything else (jaxprs, which `walk` opens
  and compares itself, wrapped functions, thunks, shardings) is taken as equal.
  """
  if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
  if isinstance(a, (np.ndarray, np.generic)) or isinstance(b, (np.ndarray, np.generic)):
    return np.shape(a) == np.shape(b) and np.array_equal(np.asarray(a), np.asarray(b))
  if isinstance(a, _DATA) or isinstance(b, _DATA):
    return type(a) is type(b) and a == b
  return True


def _check_twins(eqn: Any, eqn_b: Any, batches: tuple[int, int]) -> None:
  """Raises NotImplementedError unless ``eqn_b`` (the other batch size's trace) is ``eqn``.

  The primitives, literal operands and non-shape parameters must be equal: a
  value that depends on the batch size (``x - x.mean(0)`` divides by it) would
  otherwise be frozen at the first trace's batch.
  """
  name = eqn.primitive.name
  again = 'ONNX export needs one graph for every batch size'
  if name != eqn_b.primitive.name:
    raise NotImplementedError(
      f'the model traces to {name} at batch {batches[0]} and {eqn_b.primitive.name} at '
      f'batch {batches[1]}; {again}'
    )
  for i, (v, w) in enumerate(zip(eqn.invars, eqn_b.invars, strict=True)):
    lit_v, lit_w = isinstance(v, jcore.Literal), isinstance(w, jcore.Literal)
    if lit_v != lit_w or (
      lit_v
      and not (
        np.shape(v.val) == np.shape(w.val) and np.array_equal(np.asarray(v.val), np.asarray(w.val))
      )
    ):
      a = _short(v.val) if lit_v else 'a computed value'
      b = _short(w.val) if lit_w else 'a computed value'
      raise NotImplementedError(
        f'operand {i} of {name} depends on the batch size: {a} at batch {batches[0]}, '
        f'{b} at batch {batches[1]} (e.g. a mean over the batch divides by it); {again}'
      )
  for key in sorted(set(eqn.params) | set(eqn_b.params)):
    if key in _SHAPE_PARAMS:
      continue
    a, b = eqn.params.get(key), eqn_b.params.get(key)
    if not _same(a, b):
      raise NotImplementedError(
        f'parameter {key!r} of {name} depends on the batch size: {a!r} at batch {batches[0]}, '
        f'{b!r} at batch {batches[1]}; {again}'
      )


def _trace(fn: Callable[..., Any], input_shape: Sequence[int], leaves: Sequence[Any]):
  """``fn(x, *leaves)`` traced at the two batch sizes of `_TRACE_BATCHES`."""
  specs = [jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for v in leaves]
  out = []
  for batch in _TRACE_BATCHES:
    x = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
    out.append(jax.make_jaxpr(fn)(x, *specs))
  return out
