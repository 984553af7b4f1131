"""The ONNX graph being built: nodes, initializers and constants with fresh names.

Also the graph's input and output names, its symbolic batch dimension and the opsets
`ec2t_jax.onnx_export.to_onnx` writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from onnx import helper, numpy_helper

from ec2t_jax.onnx_export.tracing import _Batch

__all__ = ['BATCH_DIM', 'DEFAULT_OPSET', 'INPUT_NAME', 'MAX_OPSET', 'MIN_OPSET', 'OUTPUT_NAME']

DEFAULT_OPSET = 18
MIN_OPSET = 17
MAX_OPSET = 21
INPUT_NAME = 'images'
OUTPUT_NAME = 'logits'
BATCH_DIM = 'batch'


def _onnx_dtype(dtype: Any) -> int:
  return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class _Graph:
  """Nodes and initializers of the graph being built, with fresh names."""

  def __init__(self, opset: int):
    self.opset = opset
    self.nodes: list[Any] = []
    self.initializers: list[Any] = []
    self._count = 0
    self._consts: dict[tuple, str] = {}
    self._batch: str | None = None

  def name(self, hint: str = 't') -> str:
    self._count += 1
    return f'{hint}_{self._count}'

  def node(self, op: str, inputs: Sequence[str], n_out: int = 1, **attrs: Any) -> Any:
    """Adds a node; returns its output name (or the list of them if ``n_out > 1``)."""
    outs = [self.name(op.lower()) for _ in range(n_out)]
    self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.name(op), **attrs))
    return outs[0] if n_out == 1 else outs

  def initializer(self, value: np.ndarray, name: str) -> str:
    self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
    return name

  def const(self, value: Any, dtype: Any = None) -> str:
    """An initializer holding ``value`` (small equal constants are shared)."""
    arr = np.asarray(value, dtype)
    if arr.size <= 64:
      key = (arr.dtype.str, arr.shape, arr.tobytes())
      if key not in self._consts:
        self._consts[key] = self.initializer(arr, self.name('const'))
      return self._consts[key]
    return self.initializer(arr, self.name('const'))

  def ints(self, values: Sequence[int]) -> str:
    return self.const(np.asarray(values, np.int64).reshape(-1))

  def batch(self) -> str:
    """The run-time batch size, an int64 tensor of shape ``(1,)``."""
    if self._batch is None:
      self._batch = self.node('Shape', [INPUT_NAME], start=0, end=1)
    return self._batch

  def shape(self, dims: Sequence[int | _Batch], *, infer: bool = False) -> str:
    """An int64 shape tensor for a template; with ``infer``, one batch dim may become -1."""
    batch_dims = [d for d in dims if isinstance(d, _Batch)]
    if not batch_dims:
      return self.ints(dims)
    if infer and len(batch_dims) == 1:
      return self.ints([-1 if isinstance(d, _Batch) else d for d in dims])
    pieces, run = [], []
    for d in dims:
      if isinstance(d, _Batch):
        if run:
          pieces.append(self.ints(run))
          run = []
        n = self.batch()
        pieces.append(n if d.k == 1 else self.node('Mul', [n, self.ints([d.k])]))
      else:
        run.append(d)
    if run:
      pieces.append(self.ints(run))
    return self.node('Concat', pieces, axis=0)

  def reduce(self, op: str, x: str, axes: Sequence[int], keepdims: int = 0) -> str:
    """``op`` over ``axes``, with the axes as input or attribute as the opset wants."""
    if op == 'ReduceSum' or self.opset >= 18:
      return self.node(op, [x, self.ints(axes)], keepdims=keepdims)
    return self.node(op, [x], axes=list(axes), keepdims=keepdims)
