"""ONNX export of a trained EC2T network, with its ternary kernels stored as int8.

`to_onnx` traces ``model.apply(variables, x, train=False)`` to a jaxpr whose
inputs are the image batch and every variable leaf, and translates that jaxpr
equation by equation into an ONNX graph with `onnx.helper` (no third-party
converter). The graph runs in any ONNX runtime; the tests compare
onnxruntime's CPU logits with `model.apply` (docs/onnx.md).

What the file holds:

* a ternary leaf ``q`` with values ``{-w_n, 0, +w_p}`` (EC2T, Marban et al.,
  CVPR-W 2020, arXiv 2004.01077, §3) is an int8 initializer ``t = sign(q)``
  plus its two float scales; the graph rebuilds the kernel as
  ``w_p·relu(t) - w_n·relu(-t)`` (the two masks and the paper's two
  multiplications), which is bit-identical to ``q`` and which a runtime folds
  into a constant when it loads the model;
* a BatchNorm in eval mode that directly follows a convolution is folded into
  it: with ``s = γ / sqrt(var + ε)`` the convolution's kernel becomes ``K·s``
  (per output channel; for a ternary ``K`` still stored as int8 plus its
  scales, with ``s`` as one float vector) and its bias ``(b - mean)·s + β``,
  so that no normalization runs at inference;
* every other leaf is a float initializer; leaves the graph does not read
  (the folded BatchNorm statistics) are left out.

The batch dimension is symbolic (``'batch'``): the model is traced at two batch
sizes, and every dimension that differs between the two traces is a multiple
of the batch, which the graph computes from its input's shape at run time.

Example:
  >>> from ec2t_jax import models
  >>> model = models.create('lenet5', num_classes=10)
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  >>> proto = to_onnx(model, variables, (28, 28, 1))  # doctest: +SKIP
  >>> save('lenet5.onnx', proto)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from ec2t_jax import tree_util
from ec2t_jax.scoring import jaxprs

try:
  import onnx
  from onnx import helper, numpy_helper
except ImportError as e:  # pragma: no cover - depends on the environment.
  raise ImportError("ONNX export needs the onnx package: pip install 'ec2t_jax[onnx]'") from e

__all__ = [
  'DEFAULT_OPSET',
  'INPUT_NAME',
  'OUTPUT_NAME',
  'FoldedBatchNorm',
  'MAX_OPSET',
  'MIN_OPSET',
  'folded_batch_norms',
  'save',
  'ternary_initializers',
  'to_onnx',
]

DEFAULT_OPSET = 18
MIN_OPSET = 17
MAX_OPSET = 21
INPUT_NAME = 'images'
OUTPUT_NAME = 'logits'
BATCH_DIM = 'batch'
# Batch sizes of the two traces; any two distinct sizes work.
_TRACE_BATCHES = (2, 3)
_INT64_MAX = np.iinfo(np.int64).max
_INT64_MIN = np.iinfo(np.int64).min


# --- BatchNorm folding ------------------------------------------------------------------------


class FoldedBatchNorm(NamedTuple):
  """One convolution and the eval-mode BatchNorm folded into it.

  Attributes:
    conv: the convolution's module path (``'layer1_0/conv1'``).
    norm: the BatchNorm's module path.
    scale: ``γ / sqrt(var + ε)``, one value per output channel.
    bias: ``(b - mean)·scale + β``, the folded convolution's bias.
  """

  conv: str
  norm: str
  scale: np.ndarray
  bias: np.ndarray


def _module_path(module: Any) -> str | None:
  scope = getattr(module, 'scope', None)
  return None if scope is None else '/'.join(scope.path)


def _foldable_norm(module: Any, args: tuple, kwargs: Mapping[str, Any]) -> bool:
  """Whether a BatchNorm call normalizes with its running averages over the last axis."""
  from flax import linen as nn

  if kwargs.get('mask') is not None or len(args) != 1:
    return False
  x = args[0]
  running = nn.merge_param(
    'use_running_average', module.use_running_average, kwargs.get('use_running_average')
  )
  axis = module.axis if isinstance(module.axis, int) else None
  return bool(running) and axis is not None and axis % x.ndim == x.ndim - 1


def _in_scope(eqn: Any, path: str) -> bool:
  """Whether an equation was traced inside the module at ``path`` (its JAX name stack)."""
  stack = '/' + str(eqn.source_info.name_stack) + '/'
  return f'/{path}/' in stack


def _only_feeds(jaxpr: Any, conv: str, norm: str) -> bool:
  """Whether every value the conv's equations hand out is read by the BatchNorm only.

  Folding replaces the conv's output by the BatchNorm's, so any other reader
  would change; a value that leaves the conv without a reader in ``norm``
  (or leaves the model) rules the pair out.
  """
  produced = {v for e in jaxpr.eqns if _in_scope(e, conv) for v in e.outvars}
  if not produced or produced & set(jaxpr.outvars):
    return False
  seen_norm = False
  for e in jaxpr.eqns:
    if _in_scope(e, conv):
      continue
    if any(v in produced for v in e.invars if not isinstance(v, jcore.Literal)):
      if not _in_scope(e, norm):
        return False
      seen_norm = True
  return seen_norm


def _pairs(model: Any, variables: Any, x: jax.ShapeDtypeStruct) -> list[tuple[str, str, float]]:
  """``[(conv path, BatchNorm path, ε)]`` of every BatchNorm whose input is a conv's output.

  The pairs come from the module calls (a BatchNorm called on exactly the
  array a ``nn.Conv`` returned), and each is confirmed on the traced jaxpr:
  nothing but the BatchNorm reads the conv's output. A module called more than
  once is never folded.
  """
  from flax import linen as nn

  calls: dict[str, int] = {}
  conv_out: dict[int, str] = {}
  keep = []  # Keeps the traced outputs alive, so that their ids stay unique.
  found = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != '__call__':
      return out
    path = _module_path(module)
    if path is None:
      return out
    calls[path] = calls.get(path, 0) + 1
    if isinstance(module, nn.Conv) and getattr(module, 'mask', None) is None:
      conv_out[id(out)] = path
      keep.append(out)
    elif isinstance(module, nn.BatchNorm) and args and id(args[0]) in conv_out:
      if _foldable_norm(module, args, kwargs):
        found.append((conv_out[id(args[0])], path, float(module.epsilon)))
    return out

  with nn.intercept_methods(record):
    closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
  return [
    p
    for p in found
    if calls[p[0]] == 1 and calls[p[1]] == 1 and _only_feeds(closed.jaxpr, p[0], p[1])
  ]


def folded_batch_norms(
  model: Any, variables: Any, input_shape: Sequence[int]
) -> list[FoldedBatchNorm]:
  """The convolution → BatchNorm pairs `to_onnx` folds, with their folded scale and bias.

  A pair is a ``flax.linen.Conv`` (without mask) whose output is the input of
  an ``nn.BatchNorm`` that normalizes over the last axis with its running
  averages (``train=False``), each module called once per forward pass.

  Args:
    model: a linen module called as ``model.apply(variables, x, train=False)``.
    variables: its variables (concrete arrays; ``batch_stats`` included).
    input_shape: one example's shape, without the batch, e.g. ``(32, 32, 3)``.

  Returns:
    One `FoldedBatchNorm` per pair, in call order.
  """
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  flat = tree_util.flat_dict(jax.device_get(variables))
  out = []
  for conv, norm, eps in _pairs(model, variables, x):

    def get(collection, path, name, default=None):
      value = flat.get(f'{collection}/{path}/{name}')
      return default if value is None else np.asarray(value, np.float64)

    mean = get('batch_stats', norm, 'mean')
    var = get('batch_stats', norm, 'var')
    if mean is None or var is None:
      continue
    gamma = get('params', norm, 'scale', 1.0)
    beta = get('params', norm, 'bias', 0.0)
    conv_bias = get('params', conv, 'bias', 0.0)
    scale = gamma / np.sqrt(var + eps)
    bias = (conv_bias - mean) * scale + beta
    dtype = np.asarray(flat[f'params/{conv}/kernel']).dtype
    out.append(FoldedBatchNorm(conv, norm, scale.astype(dtype), bias.astype(dtype)))
  return out


@contextlib.contextmanager
def _folding(folds: Mapping[str, tuple[Any, Any]], norms: set[str]) -> Iterator[None]:
  """Runs convs in ``folds`` with kernel ``K·scale`` and bias, and their BatchNorms as identity.

  ``folds`` maps a conv path to its (traced) ``(scale, bias)``.
  """
  from flax import linen as nn

  inside = []

  def fold(next_fun, args, kwargs, context):
    path = _module_path(context.module)
    if inside or context.method_name != '__call__' or path is None:
      return next_fun(*args, **kwargs)
    if path in norms:
      return args[0]
    if path in folds:
      module = context.module
      scale, bias = folds[path]
      kernel = module.variables['params']['kernel']
      conv = module.clone(parent=None, name=None, use_bias=True)
      inside.append(path)
      try:
        return conv.apply({'params': {'kernel': kernel * scale, 'bias': bias}}, *args, **kwargs)
      finally:
        inside.pop()
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(fold):
    yield


# --- tracing ----------------------------------------------------------------------------------


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


# --- the graph --------------------------------------------------------------------------------


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


_UNARY = {
  'neg': 'Neg',
  'exp': 'Exp',
  'log': 'Log',
  'tanh': 'Tanh',
  'erf': 'Erf',
  'logistic': 'Sigmoid',
  'sqrt': 'Sqrt',
  'abs': 'Abs',
  'sign': 'Sign',
  'floor': 'Floor',
  'ceil': 'Ceil',
  'sin': 'Sin',
  'cos': 'Cos',
  'not': 'Not',
}
_BINARY = {
  'add': 'Add',
  'sub': 'Sub',
  'mul': 'Mul',
  'div': 'Div',
  'max': 'Max',
  'min': 'Min',
  'pow': 'Pow',
  'eq': 'Equal',
  'lt': 'Less',
  'le': 'LessOrEqual',
  'gt': 'Greater',
  'ge': 'GreaterOrEqual',
  'and': 'And',
  'or': 'Or',
  'xor': 'Xor',
}
_REDUCE = {
  'reduce_sum': 'ReduceSum',
  'reduce_max': 'ReduceMax',
  'reduce_min': 'ReduceMin',
  'reduce_prod': 'ReduceProd',
}
# Primitives that leave their operand as it is (at inference).
_IDENTITY = frozenset(
  {'copy', 'copy_p', 'stop_gradient', 'optimization_barrier', 'sharding_constraint', 'mesh_cast'}
)


class _Translator:
  """Walks a jaxpr (and its twin traced at the other batch size) and emits ONNX nodes."""

  def __init__(self, graph: _Graph, batches: tuple[int, int]):
    self.g = graph
    self.batches = batches
    self.env: dict[Any, Any] = {}  # Var -> onnx name, or a thunk making it on first read.
    self.dims: dict[Any, tuple[int | _Batch, ...]] = {}

  def read(self, v: Any) -> str:
    if isinstance(v, jcore.Literal):
      return self.g.const(np.asarray(v.val, v.aval.dtype))
    value = self.env[v]
    if callable(value):
      value = self.env[v] = value()
    return value

  def dims_of(self, v: Any) -> tuple[int | _Batch, ...]:
    if isinstance(v, jcore.Literal):
      return tuple(int(d) for d in v.aval.shape)
    return self.dims[v]

  def bind(self, jaxpr: Any, twin: Any, names: Sequence[Any]) -> None:
    for v, w, name in zip(jaxpr.invars, twin.invars, names, strict=True):
      self.env[v] = name
      self.dims[v] = _dims(v.aval, w.aval, self.batches)

  def walk(
    self, jaxpr: Any, twin: Any, consts: Sequence[Any] = (), twin_consts: Sequence[Any] = ()
  ) -> list[str]:
    """Translates every equation; returns the names of the jaxpr's outputs.

    ``twin`` is the same computation traced at the other batch size; every
    equation must match its twin in primitive, literal operands and parameters
    (`_check_twins`), so that the values frozen into the graph hold at any batch.
    """
    for i, (c, c_b) in enumerate(zip(consts, twin_consts, strict=True)):
      if np.shape(c) == np.shape(c_b) and not np.array_equal(np.asarray(c), np.asarray(c_b)):
        raise NotImplementedError(
          f'constant {i} of the traced model depends on the batch size '
          f'({_short(c)} at batch {self.batches[0]}, {_short(c_b)} at batch {self.batches[1]}); '
          'ONNX export needs one graph for every batch size'
        )
    for v, c in zip(jaxpr.constvars, consts, strict=True):
      self.env[v] = self.g.const(np.asarray(c))
      self.dims[v] = tuple(int(d) for d in np.shape(c))
    if len(jaxpr.eqns) != len(twin.eqns):
      raise NotImplementedError(
        f'the model traces to {len(jaxpr.eqns)} equations at batch {self.batches[0]} and '
        f'{len(twin.eqns)} at batch {self.batches[1]}; '
        'ONNX export needs one graph for every batch size'
      )
    for eqn, eqn_b in zip(jaxpr.eqns, twin.eqns, strict=True):
      _check_twins(eqn, eqn_b, self.batches)
      for v in eqn.outvars:
        dtype = v.aval.dtype
        if _is_float(dtype) and np.dtype(dtype) != np.float32:
          raise ValueError(
            f'the model computes {eqn.primitive.name} in {dtype} '
            f'(output {v.aval.str_short()}); {_FLOAT32_HOWTO}'
          )
      for v, w in zip(eqn.outvars, eqn_b.outvars, strict=True):
        self.dims[v] = _dims(v.aval, w.aval, self.batches)
      body = jaxprs.call_body(eqn)
      if body is not None:
        body_b = jaxprs.call_body(eqn_b)
        inner, consts_in = body
        for v, w, outer in zip(inner.invars, body_b[0].invars, eqn.invars, strict=True):
          self.env[v] = self.read(outer)
          self.dims[v] = _dims(v.aval, w.aval, self.batches)
        outs = self.walk(inner, body_b[0], consts_in, body_b[1])
      else:
        outs = self.equation(eqn)
      for v, name in zip(eqn.outvars, outs, strict=True):
        self.env[v] = name
    return [self.read(v) for v in jaxpr.outvars]

  # One method per family of primitives; each returns the list of output names.

  def equation(self, eqn: Any) -> list[str]:
    name = eqn.primitive.name
    g = self.g
    p = eqn.params
    out_aval = eqn.outvars[0].aval
    if name in _IDENTITY:
      return [self.read(v) for v in eqn.invars]
    if name in _UNARY:
      return [g.node(_UNARY[name], [self.read(eqn.invars[0])])]
    if name in _BINARY:
      return [g.node(_BINARY[name], [self.read(v) for v in eqn.invars])]
    if name in _REDUCE:
      return [g.reduce(_REDUCE[name], self.read(eqn.invars[0]), p['axes'])]
    method = getattr(self, f'_{name}', None)
    if method is None:
      raise NotImplementedError(
        f'ONNX export does not translate the JAX primitive {name!r} '
        f'(output {out_aval.str_short()}); see docs/onnx.md for the supported ones'
      )
    # `accuracy` (of transcendental functions) has no ONNX counterpart.
    p = {k: v for k, v in p.items() if k != 'accuracy'}
    return method(eqn, *[self.read(v) for v in eqn.invars], **p)

  def _ne(self, eqn, a, b):
    del eqn
    return [self.g.node('Not', [self.g.node('Equal', [a, b])])]

  def _rsqrt(self, eqn, x):
    del eqn
    return [self.g.node('Reciprocal', [self.g.node('Sqrt', [x])])]

  def _erfc(self, eqn, x):
    # ``1 - Erf(x)`` cancels for large x: erfc(3) ≈ 2.2e-5, so past x ≈ 3 it keeps only a
    # few correct digits, and where float32 erf rounds to 1 it is 0 (erfc(5) ≈ 1.5e-12).
    # The absolute error stays near float32's epsilon, which is what GELU's
    # ``x·erfc(-x/√2)/2`` needs; ONNX has no Erfc operator to do better.
    one = self.g.const(np.ones((), eqn.outvars[0].aval.dtype))
    return [self.g.node('Sub', [one, self.g.node('Erf', [x])])]

  def _square(self, eqn, x):
    del eqn
    return [self.g.node('Mul', [x, x])]

  def _exp2(self, eqn, x):
    two = self.g.const(np.asarray(2, eqn.outvars[0].aval.dtype))
    return [self.g.node('Pow', [two, x])]

  def _log1p(self, eqn, x):
    one = self.g.const(np.ones((), eqn.outvars[0].aval.dtype))
    return [self.g.node('Log', [self.g.node('Add', [one, x])])]

  def _expm1(self, eqn, x):
    one = self.g.const(np.ones((), eqn.outvars[0].aval.dtype))
    return [self.g.node('Sub', [self.g.node('Exp', [x]), one])]

  def _is_finite(self, eqn, x):
    del eqn
    bad = self.g.node('Or', [self.g.node('IsInf', [x]), self.g.node('IsNaN', [x])])
    return [self.g.node('Not', [bad])]

  def _round(self, eqn, x, rounding_method):
    if int(rounding_method) != 1:  # 1 = to nearest even, as ONNX Round.
      raise NotImplementedError(
        f'ONNX export translates round only to nearest even, got rounding_method={rounding_method}'
      )
    del eqn
    return [self.g.node('Round', [x])]

  def _rem(self, eqn, a, b):
    del eqn  # JAX's rem takes the dividend's sign, as C's fmod: ONNX Mod with fmod=1.
    return [self.g.node('Mod', [a, b], fmod=1)]

  def _integer_pow(self, eqn, x, y):
    del eqn
    g = self.g
    n = abs(int(y))
    if n == 0:
      raise NotImplementedError('integer_pow with y=0 is not translated')
    acc, base = None, x
    while n:  # Square-and-multiply.
      if n & 1:
        acc = base if acc is None else g.node('Mul', [acc, base])
      n >>= 1
      if n:
        base = g.node('Mul', [base, base])
    return [g.node('Reciprocal', [acc]) if y < 0 else acc]

  def _clamp(self, eqn, lo, x, hi):
    del eqn
    return [self.g.node('Min', [self.g.node('Max', [x, lo]), hi])]

  def _select_n(self, eqn, which, *cases):
    g = self.g
    if len(cases) == 1:
      return [cases[0]]
    if np.dtype(eqn.invars[0].aval.dtype) == np.bool_:
      return [g.node('Where', [which, cases[1], cases[0]])]
    out = cases[-1]
    for i in range(len(cases) - 2, -1, -1):
      index = g.const(np.asarray(i, eqn.invars[0].aval.dtype))
      out = g.node('Where', [g.node('Equal', [which, index]), cases[i], out])
    return [out]

  def _convert_element_type(self, eqn, x, new_dtype, **unused):
    del unused
    if np.dtype(eqn.invars[0].aval.dtype) == np.dtype(new_dtype):
      return [x]
    return [self.g.node('Cast', [x], to=_onnx_dtype(new_dtype))]

  def _reduce_precision(self, eqn, x, exponent_bits, mantissa_bits):
    info = jnp.finfo(eqn.invars[0].aval.dtype)
    if (exponent_bits, mantissa_bits) != (info.nexp, info.nmant):
      raise NotImplementedError(
        f'reduce_precision to {exponent_bits} exponent and {mantissa_bits} mantissa bits '
        'is not translated'
      )
    return [x]

  def _argmax(self, eqn, x, axes, index_dtype):
    return self._arg('ArgMax', eqn, x, axes, index_dtype)

  def _argmin(self, eqn, x, axes, index_dtype):
    return self._arg('ArgMin', eqn, x, axes, index_dtype)

  def _arg(self, op, eqn, x, axes, index_dtype):
    del eqn
    out = self.g.node(op, [x], axis=int(axes[0]), keepdims=0, select_last_index=0)
    if np.dtype(index_dtype) != np.int64:
      out = self.g.node('Cast', [out], to=_onnx_dtype(index_dtype))
    return [out]

  def _cumsum(self, eqn, x, axis, reverse):
    del eqn
    return [self.g.node('CumSum', [x, self.g.ints([axis])], reverse=int(reverse))]

  def _iota(self, eqn, dtype, shape, dimension, **unused):
    del unused
    dims = self.dims[eqn.outvars[0]]
    if any(isinstance(d, _Batch) for d in dims):
      raise NotImplementedError('iota over the batch dimension is not translated')
    values = np.arange(shape[dimension], dtype=dtype)
    view = [1] * len(shape)
    view[dimension] = shape[dimension]
    return [self.g.const(np.broadcast_to(values.reshape(view), shape).copy())]

  def _reshape(self, eqn, x, new_sizes, dimensions, **unused):
    del new_sizes, unused
    if dimensions is not None:
      raise NotImplementedError(f'reshape with dimensions={dimensions} is not translated')
    in_dims, out_dims = self.dims_of(eqn.invars[0]), self.dims[eqn.outvars[0]]
    if in_dims == out_dims:
      return [x]
    return [self.g.node('Reshape', [x, self.g.shape(out_dims, infer=True)])]

  def _squeeze(self, eqn, x, dimensions):
    del eqn
    return [self.g.node('Squeeze', [x, self.g.ints(dimensions)])]

  def _expand_dims(self, eqn, x, dimensions):
    del eqn
    return [self.g.node('Unsqueeze', [x, self.g.ints(dimensions)])]

  def _broadcast_in_dim(self, eqn, x, shape, broadcast_dimensions, **unused):
    del unused
    g = self.g
    in_dims, out_dims = self.dims_of(eqn.invars[0]), self.dims[eqn.outvars[0]]
    kept = [int(d) for d in broadcast_dimensions]
    if kept != sorted(kept):
      raise NotImplementedError(f'broadcast_in_dim with unsorted dimensions {kept}')
    new = [i for i in range(len(shape)) if i not in kept]
    if new:
      x = g.node('Unsqueeze', [x, g.ints(new)])
    target = list(out_dims)
    for j, i in enumerate(kept):
      if in_dims[j] == out_dims[i]:
        target[i] = 1  # Expand broadcasts: 1 keeps the operand's own size.
    if all(d == 1 for d in target):
      return [x]
    return [g.node('Expand', [x, g.shape(target)])]

  def _transpose(self, eqn, x, permutation):
    del eqn
    return [self.g.node('Transpose', [x], perm=[int(i) for i in permutation])]

  def _concatenate(self, eqn, *xs, dimension):
    del eqn
    return [self.g.node('Concat', list(xs), axis=int(dimension))]

  def _split(self, eqn, x, sizes, axis):
    del eqn
    outs = self.g.node('Split', [x, self.g.ints(sizes)], n_out=len(sizes), axis=int(axis))
    return outs if len(sizes) > 1 else [outs]

  def _slice_axes(self, eqn, x, starts, limits, steps):
    dims = self.dims_of(eqn.invars[0])
    axes, s, e, st = [], [], [], []
    out_dims = self.dims[eqn.outvars[0]]
    for axis, (d, lo, hi, step) in enumerate(zip(dims, starts, limits, steps, strict=True)):
      if isinstance(d, _Batch):
        # The whole batch (the same symbol out as in) is kept as it is; any other slice of
        # it (``x[:1]``, ``x[::2]``) would be frozen at the trace's batch size.
        if lo == 0 and step == 1 and out_dims[axis] == d:
          continue
        raise NotImplementedError(
          f'{eqn.primitive.name} of the batch dimension (axis {axis}: start {lo}, limit {hi}, '
          f'step {step} at batch {self.batches[0]}, output {out_dims[axis]}) is not translated; '
          'only the whole batch can be kept'
        )
      if lo == 0 and step == 1 and hi == d:
        continue
      axes.append(axis)
      s.append(int(lo))
      e.append(int(hi))
      st.append(int(step))
    if not axes:
      return [x]
    g = self.g
    return [g.node('Slice', [x, g.ints(s), g.ints(e), g.ints(axes), g.ints(st)])]

  def _slice(self, eqn, x, start_indices, limit_indices, strides):
    steps = strides or (1,) * len(start_indices)
    return self._slice_axes(eqn, x, start_indices, limit_indices, steps)

  def _dynamic_slice(self, eqn, x, *starts, slice_sizes):
    del starts
    shape = eqn.invars[0].aval.shape
    lo = []
    for v, size, dim in zip(eqn.invars[1:], slice_sizes, shape, strict=True):
      if not isinstance(v, jcore.Literal):
        raise NotImplementedError('dynamic_slice with computed start indices is not translated')
      lo.append(min(max(int(v.val), 0), dim - size))  # JAX clamps the start into range.
    hi = [a + s for a, s in zip(lo, slice_sizes, strict=True)]
    return self._slice_axes(eqn, x, lo, hi, [1] * len(lo))

  def _rev(self, eqn, x, dimensions):
    del eqn
    g = self.g
    n = len(dimensions)
    starts, ends = g.ints([-1] * n), g.ints([_INT64_MIN] * n)
    return [g.node('Slice', [x, starts, ends, g.ints(dimensions), g.ints([-1] * n)])]

  def _pad(self, eqn, x, value, padding_config):
    del eqn
    if any(interior for _, _, interior in padding_config):
      raise NotImplementedError('pad with interior padding is not translated')
    if any(lo < 0 or hi < 0 for lo, hi, _ in padding_config):
      raise NotImplementedError('pad with negative padding is not translated')
    pads = [lo for lo, _, _ in padding_config] + [hi for _, hi, _ in padding_config]
    return [self.g.node('Pad', [x, self.g.ints(pads), value], mode='constant')]

  def _dot_general(self, eqn, a, b, dimension_numbers, preferred_element_type=None, **unused):
    del unused
    g = self.g
    (lc, rc), (lb, rb) = dimension_numbers
    ra, rb_rank = eqn.invars[0].aval.ndim, eqn.invars[1].aval.ndim
    if not lb and tuple(lc) == (ra - 1,) and tuple(rc) == (0,) and rb_rank == 2 and ra >= 1:
      out = g.node('MatMul', [a, b])
    else:
      letters = iter('abcdefghijklmnopqrstuvwxyz')
      la = [next(letters) for _ in range(ra)]
      lr: list[str | None] = [None] * rb_rank
      for i, j in zip(lc, rc, strict=True):
        lr[j] = la[i]
      for i, j in zip(lb, rb, strict=True):
        lr[j] = la[i]
      lr = [c if c is not None else next(letters) for c in lr]
      free_a = [la[i] for i in range(ra) if i not in lc and i not in lb]
      free_b = [lr[j] for j in range(rb_rank) if j not in rc and j not in rb]
      spec = ''.join(la) + ',' + ''.join(lr) + '->' + ''.join([la[i] for i in lb] + free_a + free_b)
      out = g.node('Einsum', [a, b], equation=spec)
    return [self._cast_to(out, eqn.invars[0].aval.dtype, eqn.outvars[0].aval.dtype)]

  def _cast_to(self, x, have, want):
    if np.dtype(have) == np.dtype(want):
      return x
    return self.g.node('Cast', [x], to=_onnx_dtype(want))

  def _conv_general_dilated(
    self,
    eqn,
    x,
    w,
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    feature_group_count,
    batch_group_count,
    **unused,
  ):
    del unused
    g = self.g
    if any(d != 1 for d in lhs_dilation) or batch_group_count != 1:
      raise NotImplementedError(
        'conv_general_dilated with lhs_dilation (a transposed convolution) or '
        f'batch_group_count={batch_group_count} is not translated'
      )
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    xt = g.node('Transpose', [x], perm=[int(i) for i in lhs_spec])
    wt = g.node('Transpose', [w], perm=[int(i) for i in rhs_spec])
    if isinstance(padding, str):
      raise NotImplementedError(f'conv_general_dilated with padding={padding!r}')
    pads = [int(lo) for lo, _ in padding] + [int(hi) for _, hi in padding]
    if any(p < 0 for p in pads):
      raise NotImplementedError(f'conv_general_dilated with negative padding {padding}')
    kernel = [int(eqn.invars[1].aval.shape[i]) for i in rhs_spec[2:]]
    y = g.node(
      'Conv',
      [xt, wt],
      kernel_shape=kernel,
      strides=[int(s) for s in window_strides],
      pads=pads,
      dilations=[int(d) for d in rhs_dilation],
      group=int(feature_group_count),
    )
    y = g.node('Transpose', [y], perm=[int(i) for i in np.argsort(out_spec)])
    return [self._cast_to(y, eqn.invars[0].aval.dtype, eqn.outvars[0].aval.dtype)]

  def _pool(
    self, op, eqn, x, window_dimensions, window_strides, padding, base_dilation, window_dilation
  ):
    g = self.g
    if any(d != 1 for d in base_dilation):
      raise NotImplementedError(f'{eqn.primitive.name} with base_dilation is not translated')
    rank = len(window_dimensions)
    spatial = [
      i
      for i in range(rank)
      if window_dimensions[i] != 1
      or window_strides[i] != 1
      or tuple(padding[i]) != (0, 0)
      or window_dilation[i] != 1
    ]
    if not spatial:
      return [x]
    other = [i for i in range(rank) if i not in spatial]
    if len(other) != 2:
      raise NotImplementedError(
        f'{eqn.primitive.name} pooling over {len(spatial)} of {rank} axes is not translated '
        '(ONNX pools all axes but two)'
      )
    perm = other + spatial
    attrs = dict(
      kernel_shape=[int(window_dimensions[i]) for i in spatial],
      strides=[int(window_strides[i]) for i in spatial],
      pads=[int(padding[i][0]) for i in spatial] + [int(padding[i][1]) for i in spatial],
    )
    if any(window_dilation[i] != 1 for i in spatial):
      if op == 'AveragePool' and g.opset < 19:
        raise NotImplementedError('dilated sum pooling needs opset >= 19')
      attrs['dilations'] = [int(window_dilation[i]) for i in spatial]
    if op == 'AveragePool':
      attrs['count_include_pad'] = 1
    y = g.node(op, [g.node('Transpose', [x], perm=perm)], **attrs)
    if op == 'AveragePool':  # A sum is the mean over the (padded) window times its size.
      size = math.prod(int(window_dimensions[i]) for i in spatial)
      y = g.node('Mul', [y, g.const(np.asarray(size, eqn.outvars[0].aval.dtype))])
    return [g.node('Transpose', [y], perm=[int(i) for i in np.argsort(perm)])]

  def _reduce_window_max(self, eqn, x, **p):
    return self._pool('MaxPool', eqn, x, **p)

  def _reduce_window_sum(self, eqn, x, **p):
    return self._pool('AveragePool', eqn, x, **p)


# --- ternary leaves ---------------------------------------------------------------------------


def _ternary_kernel(graph: _Graph, name: str, values: np.ndarray) -> str:
  """``w_p·relu(t) - w_n·relu(-t)`` from the int8 ``t = sign(values)`` and the two scales."""
  w_p, w_n = tree_util.ternary_levels(values)
  t = graph.initializer(np.sign(values).astype(np.int8), f'{name}:int8')
  scale_p = graph.initializer(np.asarray(w_p, values.dtype), f'{name}:w_p')
  scale_n = graph.initializer(np.asarray(w_n, values.dtype), f'{name}:w_n')
  tf = graph.node('Cast', [t], to=_onnx_dtype(values.dtype))
  pos = graph.node('Mul', [graph.node('Relu', [tf]), scale_p])
  neg = graph.node('Mul', [graph.node('Relu', [graph.node('Neg', [tf])]), scale_n])
  return graph.node('Sub', [pos, neg])


def _check_ternary(flat: Mapping[str, np.ndarray], names: Any) -> list[str]:
  out = []
  for name in sorted(names):
    if name not in flat:
      raise ValueError(
        f'ternary leaf {name!r} is not a leaf of the variables; valid names look like '
        f'{sorted(flat)[:3]}'
      )
    value = flat[name]
    if tree_util.ternary_levels(value) is None:  # Also None for a non-floating leaf.
      raise ValueError(
        f'ternary leaf {name!r} does not hold the values {{-w_n, 0, +w_p}} '
        f'({value.dtype}, {np.unique(value).size} distinct values)'
      )
    if np.any(np.signbit(value[value == 0])):
      raise ValueError(f'ternary leaf {name!r} holds -0.0, which int8 storage would turn into +0.0')
    out.append(name)
  return out


_FLOAT32_HOWTO = (
  'ONNX export supports float32 computation only: export the float32 model, e.g. create it '
  'with dtype=jnp.float32 and cast the variables with '
  'jax.tree.map(lambda a: a.astype(jnp.float32), variables)'
)


def _is_float(dtype: Any) -> bool:
  """Whether ``dtype`` is a floating type, bfloat16 and the other ml_dtypes included."""
  return jnp.issubdtype(dtype, jnp.floating)


def _check_float32(flat: Mapping[str, np.ndarray]) -> None:
  bad = {name: str(v.dtype) for name, v in flat.items() if _is_float(v.dtype)}
  bad = {name: dtype for name, dtype in bad.items() if dtype != 'float32'}
  if bad:
    name = sorted(bad)[0]
    raise ValueError(
      f'variable leaf {name!r} is {bad[name]} ({len(bad)} floating leaves are not float32); '
      + _FLOAT32_HOWTO
    )


def ternary_initializers(proto: Any) -> list[str]:
  """Names of the ternary leaves a model from `to_onnx` stores as int8 initializers."""
  return sorted(
    init.name[: -len(':int8')]
    for init in proto.graph.initializer
    if init.name.endswith(':int8') and init.data_type == onnx.TensorProto.INT8
  )


# --- public API -------------------------------------------------------------------------------


def to_onnx(
  model: Any,
  variables: Any,
  input_shape: Sequence[int],
  *,
  opset: int = DEFAULT_OPSET,
  ternary_leaves: Any = None,
  fold_batch_norm: bool = True,
  normalization: tuple[Sequence[float], Sequence[float]] | None = None,
  metadata: Mapping[str, Any] | None = None,
  check: bool = True,
) -> Any:
  """Translates a linen model's eval-mode forward pass into an ONNX model.

  The graph takes ``images``, float32 ``(batch, *input_shape)`` in the
  model's own layout (NHWC for the zoo), and returns ``logits``. The batch
  size is free.

  Args:
    model: a linen module called as ``model.apply(variables, x, train=False)``.
    variables: its variables, ``{'params': ..., 'batch_stats': ...}``.
    input_shape: one example's shape, without the batch, e.g. ``(28, 28, 1)``.
    opset: the ONNX opset, ``MIN_OPSET`` to ``MAX_OPSET``.
    ternary_leaves: paths (``'params/conv2/kernel'``) of the leaves to store as
      int8 plus two scales; default `ec2t_jax.export.ternary_leaves` of
      ``variables`` (every params leaf of 2+ dimensions with values
      ``{-w_n, 0, +w_p}``). Pass ``export.ternary_leaves(variables, opt_state)``
      to use the optimizer's selection.
    fold_batch_norm: fold eval-mode BatchNorms into the convolutions before them
      (`folded_batch_norms`).
    normalization: ``(mean, std)`` per channel; the graph then takes images on
      [0, 1] and computes ``(x - mean) / std`` first, as the training input
      pipeline does.
    metadata: JSON-serializable values recorded in the model's
      ``metadata_props`` (as JSON strings).
    check: run `onnx.checker.check_model` on the result.

  Returns:
    An ``onnx.ModelProto``; its ``metadata_props`` name the int8 leaves
    (``ec2t_jax.ternary_leaves``) and the folded pairs (``ec2t_jax.folded_batch_norms``).

  Raises:
    ValueError: for an opset out of range, an input shape with a non-positive
      dimension, a named leaf that is missing or not ternary, or a floating leaf
      or computation that is not float32 (bfloat16, float16, float64).
    NotImplementedError: for a JAX primitive without a translation (named in the
      message), a slice of the batch dimension, or a computation that depends on
      the batch size (e.g. a mean over the batch).

  Example:
    >>> proto = to_onnx(model, variables, (32, 32, 3))  # doctest: +SKIP
    >>> import onnxruntime  # doctest: +SKIP
    >>> session = onnxruntime.InferenceSession(proto.SerializeToString())  # doctest: +SKIP
    >>> logits = session.run(None, {'images': x})[0]  # doctest: +SKIP
  """
  if not MIN_OPSET <= int(opset) <= MAX_OPSET:
    raise ValueError(f'opset must be in [{MIN_OPSET}, {MAX_OPSET}], got {opset}')
  input_shape = tuple(int(d) for d in input_shape)
  if not input_shape or any(d <= 0 for d in input_shape):
    raise ValueError(
      "input_shape must be one example's shape without the batch, e.g. (28, 28, 1), "
      f'got {input_shape}'
    )
  variables = jax.device_get(variables)
  named = tree_util.named_leaves(variables)
  flat = {name: np.asarray(value) for name, value in named}
  _check_float32(flat)
  if ternary_leaves is None:
    from ec2t_jax import export

    ternary_leaves = export.ternary_leaves(variables)
  tern = set(_check_ternary(flat, ternary_leaves))

  folds = folded_batch_norms(model, variables, input_shape) if fold_batch_norm else []
  treedef = jax.tree_util.tree_structure(variables)
  leaf_names = [name for name, _ in named] + [
    f'{f.conv}/{part}:folded' for f in folds for part in ('scale', 'bias')
  ]
  leaf_values = [flat[name] for name, _ in named] + [a for f in folds for a in (f.scale, f.bias)]
  n_vars = len(named)
  norms = {f.norm for f in folds}
  mean, std = (
    (None, None)
    if normalization is None
    else (
      np.asarray(normalization[0], np.float32),
      np.asarray(normalization[1], np.float32),
    )
  )

  def forward(x, *leaves):
    v = jax.tree_util.tree_unflatten(treedef, leaves[:n_vars])
    extra = leaves[n_vars:]
    fold_args = {f.conv: (extra[2 * i], extra[2 * i + 1]) for i, f in enumerate(folds)}
    if mean is not None:
      x = (x - mean) / std
    with _folding(fold_args, norms) if folds else contextlib.nullcontext():
      return model.apply(v, x, train=False)

  closed, twin = _trace(forward, input_shape, leaf_values)

  graph = _Graph(int(opset))
  tr = _Translator(graph, _TRACE_BATCHES)

  def lazy(name, value):
    if name in tern:
      return lambda: _ternary_kernel(graph, name, value)
    return lambda: graph.initializer(value, name)

  tr.bind(
    closed.jaxpr,
    twin.jaxpr,
    [INPUT_NAME] + [lazy(n, v) for n, v in zip(leaf_names, leaf_values, strict=True)],
  )
  outs = tr.walk(closed.jaxpr, twin.jaxpr, closed.consts, twin.consts)
  if len(outs) != 1:
    raise NotImplementedError(f'the model returns {len(outs)} arrays; ONNX export takes one')
  graph.nodes.append(helper.make_node('Identity', [outs[0]], [OUTPUT_NAME], name='output'))

  def value_info(name, var):
    dims = [BATCH_DIM if isinstance(d, _Batch) else d for d in tr.dims[var]]
    if any(isinstance(d, _Batch) and d.k != 1 for d in tr.dims[var]):
      raise NotImplementedError('an output dimension is a multiple of the batch size')
    return helper.make_tensor_value_info(name, _onnx_dtype(var.aval.dtype), dims)

  onnx_graph = helper.make_graph(
    graph.nodes,
    'ec2t_jax',
    [value_info(INPUT_NAME, closed.jaxpr.invars[0])],
    [value_info(OUTPUT_NAME, closed.jaxpr.outvars[0])],
    initializer=graph.initializers,
  )
  opsets = [helper.make_opsetid('', int(opset))]
  proto = helper.make_model(
    onnx_graph,
    opset_imports=opsets,
    producer_name='ec2t_jax',
    ir_version=helper.find_min_ir_version_for(opsets),
    doc_string='EC2T network (Marban et al., CVPR-W 2020); ternary kernels stored as int8',
  )
  from ec2t_jax import __version__

  proto.producer_version = __version__
  props = {
    'ec2t_jax.ternary_leaves': ternary_initializers(proto),
    'ec2t_jax.folded_batch_norms': [[f.conv, f.norm] for f in folds],
    **(metadata or {}),
  }
  helper.set_model_props(proto, {k: json.dumps(v) for k, v in props.items()})
  if check:
    onnx.checker.check_model(proto)
  return proto


def save(path: str, proto: Any) -> int:
  """Writes a model from `to_onnx` to ``path``; returns the file's size in bytes."""
  data = proto.SerializeToString()
  with open(path, 'wb') as f:
    f.write(data)
  return len(data)
