"""The translation of a jaxpr into ONNX nodes: one method per family of JAX primitives."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from ec2t_jax import jaxprs
from ec2t_jax.onnx_export.graph import _Graph, _onnx_dtype
from ec2t_jax.onnx_export.tracing import _Batch, _check_twins, _dims, _short

_INT64_MAX = np.iinfo(np.int64).max
_INT64_MIN = np.iinfo(np.int64).min

_FLOAT32_HOWTO = (
  'ONNX export supports float32 computation only: export the float32 model, e.g. create it '
  'with dtype=jnp.float32 and cast the variables with '
  'jax.tree.map(lambda a: a.astype(jnp.float32), variables)'
)


def _is_float(dtype: Any) -> bool:
  """Whether ``dtype`` is a floating type, bfloat16 and the other ml_dtypes included."""
  return jnp.issubdtype(dtype, jnp.floating)


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
