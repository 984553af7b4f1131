"""Tracing a network into a `Graph`: its layers and every other operation on activations.

`trace` turns one eval-mode forward pass (``model.apply(variables, x,
train=False)``) into a jaxpr (nothing is compiled) and walks it once, keeping
for every jaxpr variable what is known about it (`_Info`): does it depend on
the input image, is it exactly a variables leaf, which layer does it come out
of, which of its channels are identically zero. Each equation on activations
is classified by the handler `_HANDLERS` names for its primitive:

* ``conv_general_dilated`` / ``dot_general`` with a kernel leaf: a `Layer`;
  between two activations: a full-precision matmul;
* elementwise ops with a parameter operand right after a layer (bias,
  BatchNorm): folded into that layer; elsewhere: a standalone affine chain;
* additions of two activations of the same shape: residual additions (the
  shallower operand's layer is a projection shortcut);
* activations, comparisons, reductions and pooling windows: an `Op` each;
* data movement (reshape, pad, slice, ...): free, zero channels followed.

Calls (pjit, custom_jvp, remat) are walked through with
`ec2t_jax.scoring.jaxprs.call_body`; control flow on activations and unknown
primitives become warnings. docs/scoring.md describes what each mode then
counts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from ec2t_jax import jaxprs, tree_util
from ec2t_jax.scoring.graph import Graph, Layer, Op

__all__ = ['batch_one', 'trace']

# Data movement: no arithmetic.
_MOVES = frozenset(
  {
    'convert_element_type',
    'copy',
    'copy_p',
    'reshape',
    'broadcast_in_dim',
    'squeeze',
    'expand_dims',
    'transpose',
    'pad',
    'slice',
    'dynamic_slice',
    'concatenate',
    'rev',
    'gather',
    'select_n',
    'stop_gradient',
    'optimization_barrier',
    'reduce_precision',
  }
)
_BINARY = ('add', 'sub', 'mul', 'div', 'max', 'min')
_FREE = frozenset({'neg', 'abs', 'sign', 'iota', 'argmax', 'argmin'})
_TRANSCENDENTAL = frozenset(
  {'exp', 'exp2', 'log', 'log1p', 'expm1', 'tanh', 'rsqrt', 'sqrt', 'erf', 'sin', 'cos', 'pow'}
)
_COMPARE = frozenset({'gt', 'ge', 'lt', 'le', 'eq', 'ne'})
_REDUCE = frozenset({'reduce_sum', 'reduce_max', 'reduce_min', 'reduce_prod'})
_WINDOW = frozenset(
  {'reduce_window_max', 'reduce_window_min', 'reduce_window_sum', 'reduce_window'}
)


@dataclasses.dataclass
class _Info:
  """What the walk knows about one jaxpr variable."""

  act: bool = False  # depends on the input image
  param: bool = False  # derived from variables leaves (and constants) only
  leaf: str | None = None  # exactly this variables leaf (up to dtype casts)
  psize: int = 1  # elements before broadcasting (parameter side)
  src: int | None = None  # nearest layer on the main path
  fold: int | None = None  # the layer this is the output of (bias/BN folded in)
  depth: int = 0
  zero: np.ndarray | None = None  # per last-axis entry: identically zero
  chain: int | None = None  # standalone affine chain this comes out of
  literal: Any = None  # value of a scalar literal


@dataclasses.dataclass
class _Chain:
  """A run of standalone parameter-operand elementwise ops (e.g. a pre-activation BatchNorm)."""

  mul: bool = False
  add: bool = False
  channels: int = 0
  size: int = 0
  src: int | None = None


def _size(aval: Any) -> int:
  return int(math.prod(getattr(aval, 'shape', ())))


def _main(ins: Sequence[_Info]) -> _Info:
  """The deepest activation operand: the main path through the equation."""
  return max((i for i in ins if i.act), key=lambda i: i.depth)


def _plain(ins: Sequence[_Info], zero: np.ndarray | None = None) -> _Info:
  """An activation on the main path of ``ins`` that is no layer's output."""
  main = _main(ins)
  return _Info(act=True, src=main.src, depth=main.depth, zero=zero)


class _Walker:
  """Walks a jaxpr once, classifying every equation with `_HANDLERS`."""

  def __init__(self, values: Mapping[str, np.ndarray | None]):
    self.values = values
    self.layers: list[Layer] = []
    self.ops: list[Op] = []
    self.chains: list[_Chain] = []
    self.warnings: list[str] = []

  @staticmethod
  def read(env: dict[Any, _Info], var: Any) -> _Info:
    """What is known about ``var`` (a literal is a parameter-side constant)."""
    if isinstance(var, jcore.Literal):
      val = np.asarray(var.val)
      return _Info(psize=val.size, literal=val if val.size == 1 else None)
    return env.get(var, _Info())

  def walk(self, jaxpr: Any, inputs: Sequence[_Info]) -> list[_Info]:
    """Classifies every equation of ``jaxpr``; returns what is known about its outputs."""
    env: dict[Any, _Info] = {}
    for var in jaxpr.constvars:  # Constants captured by the trace: neither input nor params.
      env[var] = _Info(psize=_size(var.aval))
    for var, info in zip(jaxpr.invars, inputs, strict=True):
      env[var] = info
    for eqn in jaxpr.eqns:
      ins = [self.read(env, v) for v in eqn.invars]
      body = jaxprs.call_body(eqn)
      outs = self.walk(body[0], ins) if body is not None else self.equation(eqn, ins)
      for var, info in zip(eqn.outvars, outs, strict=True):
        env[var] = info
    return [self.read(env, v) for v in jaxpr.outvars]

  def equation(self, eqn: Any, ins: list[_Info]) -> list[_Info]:
    """What one equation (not a call) produces; records its layer or op."""
    name = eqn.primitive.name
    if not any(i.act for i in ins):
      # Parameter-side arithmetic (e.g. rsqrt(var + eps) * scale): folded offline.
      param = any(i.param for i in ins)
      leaf = ins[0].leaf if name in jaxprs.CASTS and ins else None
      psize = max([i.psize for i in ins] or [1])
      return [
        _Info(param=param, leaf=leaf, psize=min(psize, _size(v.aval)) or 1, literal=None)
        for v in eqn.outvars
      ]
    if jaxprs.has_sub_jaxpr(eqn):
      self.warnings.append(f'{name}: control flow on activations is not counted')
      return [_plain(ins) for _ in eqn.outvars]
    return _HANDLERS.get(name, _unknown)(self, eqn, ins)

  def op(
    self, kind: str, eqn: Any, ins: Sequence[_Info], mults: float = 0.0, adds: float = 0.0
  ) -> None:
    """Records an `Op` of ``eqn`` on the main path of ``ins``."""
    size = _size(eqn.outvars[0].aval)
    self.ops.append(Op(kind, eqn.primitive.name, size, mults, adds, src=_main(ins).src))

  def graph(self) -> Graph:
    """The layers, the ops (standalone affine chains last) and the sorted warnings."""
    ops = list(self.ops)
    for chain in self.chains:
      mults = chain.size if chain.mul else 0
      adds = chain.size if chain.add else 0
      params = chain.channels * (int(chain.mul) + int(chain.add))
      ops.append(Op('affine', 'batchnorm', chain.size, mults, adds, params, chain.src))
    return Graph(self.layers, ops, sorted(set(self.warnings)))


# --- handlers: one per kind of primitive -------------------------------------------------------

_Handler = Callable[[_Walker, Any, list[_Info]], list[_Info]]


def _unknown(w: _Walker, eqn: Any, ins: list[_Info]) -> list[_Info]:
  name = eqn.primitive.name
  w.warnings.append(f'{name}: unknown primitive on activations, not counted')
  w.op('uncounted', eqn, ins)
  return [_plain(ins) for _ in eqn.outvars]


def _elementwise(kind: str | None, mults: int, adds: int, keeps_zero: bool) -> _Handler:
  """A handler for a one-output op costing ``mults``/``adds`` per output element.

  ``kind`` None records no op (free ops); ``keeps_zero``: zero channels stay zero.
  """

  def handle(w: _Walker, eqn: Any, ins: list[_Info]) -> list[_Info]:
    n = _size(eqn.outvars[0].aval)
    if kind is not None:
      w.op(kind, eqn, ins, mults * n, adds * n)
    return [_plain(ins, zero=_main(ins).zero if keeps_zero else None)]

  return handle


def _reduce(w: _Walker, eqn: Any, ins: list[_Info]) -> list[_Info]:
  """A reduction (e.g. global average pooling): ``in - out`` additions."""
  in_size, out_size = _size(eqn.invars[0].aval), _size(eqn.outvars[0].aval)
  w.op('pool', eqn, ins, 0, in_size - out_size)
  channels_kept = len(eqn.invars[0].aval.shape) - 1 not in tuple(eqn.params.get('axes', ()))
  return [_plain(ins, zero=_main(ins).zero if channels_kept else None)]


def _window(w: _Walker, eqn: Any, ins: list[_Info]) -> list[_Info]:
  """A pooling window: ``window - 1`` additions (or comparisons) per output."""
  window = math.prod(eqn.params.get('window_dimensions', (1,)))
  w.op('pool', eqn, ins, 0, _size(eqn.outvars[0].aval) * (window - 1))
  return [_plain(ins, zero=_main(ins).zero)]


def _move(w: _Walker, eqn: Any, ins: list[_Info]) -> list[_Info]:
  """Data movement on an activation: no cost; follows zero channels where it can."""
  del w
  name = eqn.primitive.name
  x = ins[0]  # The operand of every move below except select_n / concatenate.
  main = _main(ins)
  in_shape = tuple(eqn.invars[0].aval.shape)
  out_shape = tuple(eqn.outvars[0].aval.shape)
  zero = None
  if name in jaxprs.CASTS or name == 'reduce_precision':
    zero = x.zero
  elif name == 'reshape' and x.zero is not None:
    if in_shape and out_shape and in_shape[-1] == out_shape[-1]:
      zero = x.zero
    else:  # Flattening the trailing axes (NHWC -> N, HWC): channels repeat fastest.
      for k in range(len(in_shape)):
        if in_shape[:k] == out_shape[:-1] and math.prod(in_shape[k:]) == out_shape[-1]:
          zero = np.tile(x.zero, math.prod(in_shape[k:-1]))
          break
  elif name == 'transpose' and tuple(eqn.params['permutation'])[-1] == len(in_shape) - 1:
    zero = x.zero
  elif name == 'pad':
    lo, hi, interior = eqn.params['padding_config'][-1]
    pad_value = ins[1].literal
    if interior == 0 and pad_value is not None and float(pad_value) == 0.0:
      base = x.zero if x.zero is not None else np.zeros(in_shape[-1], bool)
      if lo >= 0 and hi >= 0:
        zero = np.concatenate([np.ones(lo, bool), base, np.ones(hi, bool)])
      else:
        zero = base[max(-lo, 0) : len(base) - max(-hi, 0)]
  elif name == 'slice' and x.zero is not None:
    start = eqn.params['start_indices'][-1]
    limit = eqn.params['limit_indices'][-1]
    strides = eqn.params.get('strides') or (1,) * len(in_shape)
    zero = x.zero[start : limit : strides[-1]]
  elif name == 'concatenate' and eqn.params['dimension'] == len(in_shape) - 1:
    parts = []
    for info, var in zip(ins, eqn.invars, strict=True):
      n = var.aval.shape[-1]
      parts.append(info.zero if info.act and info.zero is not None else np.zeros(n, bool))
    zero = np.concatenate(parts)
  elif name == 'broadcast_in_dim' and x.zero is not None:
    dims = tuple(eqn.params['broadcast_dimensions'])
    if dims and dims[-1] == len(out_shape) - 1 and in_shape[-1] == out_shape[-1]:
      zero = x.zero
  if zero is not None and len(zero) != (out_shape[-1] if out_shape else 1):
    zero = None
  keeps_layer = name in jaxprs.CASTS or (name == 'reshape' and in_shape[-1:] == out_shape[-1:])
  return [
    _Info(
      act=True,
      src=main.src,
      depth=main.depth,
      zero=zero,
      fold=x.fold if keeps_layer and x.act else None,
      chain=x.chain if keeps_layer and x.act else None,
    )
  ]


def _binary(w: _Walker, eqn: Any, ins: list[_Info]) -> list[_Info]:
  """Two operands: residual additions, products of activations, ReLU, bias and BatchNorm."""
  if len(ins) != 2:
    return _unknown(w, eqn, ins)
  name = eqn.primitive.name
  out_size = _size(eqn.outvars[0].aval)
  a, b = ins
  if a.act and b.act:
    main, other = (a, b) if a.depth >= b.depth else (b, a)
    zero = None
    if a.zero is not None and b.zero is not None and len(a.zero) == len(b.zero):
      zero = (a.zero & b.zero) if name in ('add', 'sub', 'max', 'min') else (a.zero | b.zero)
    if name in ('add', 'sub'):
      same = tuple(eqn.invars[0].aval.shape) == tuple(eqn.invars[1].aval.shape)
      w.op('residual' if same else 'add', eqn, ins, 0, out_size)
      if same and other.depth < main.depth and other.fold is not None:
        w.layers[other.fold].projection = True
    elif name in ('mul', 'div'):
      w.op('activation', eqn, ins, out_size, 0)
    else:
      w.op('compare', eqn, ins, 0, out_size)
    return [_Info(act=True, src=main.src, depth=main.depth, zero=zero)]
  x, c = (a, b) if a.act else (b, a)
  if name in ('max', 'min'):  # ReLU, clipping.
    value = c.literal
    keep = value is not None and float(value) == 0.0
    activation = 'relu' if keep else name
    w.ops.append(Op('activation', activation, out_size, out_size, 0, src=x.src))
    if x.src is not None and w.layers[x.src].activation is None:
      w.layers[x.src].activation = activation
    return [_Info(act=True, src=x.src, depth=x.depth, zero=x.zero if keep else None)]
  keeps_zero = name == 'mul' or (name == 'div' and x is a)  # 0·c = 0/c = 0.
  zero = x.zero if keeps_zero else None
  if not c.param:  # A constant (e.g. 1/HW of a mean): one op per element unless folded.
    if x.fold is not None:
      return [_Info(act=True, src=x.src, depth=x.depth, zero=zero, fold=x.fold)]
    mults = out_size if name in ('mul', 'div') else 0
    w.ops.append(Op('scale', name, out_size, mults, out_size - mults, src=x.src))
    return [_Info(act=True, src=x.src, depth=x.depth, zero=zero)]
  if x.fold is not None:  # Bias / BatchNorm right after a layer: folded into it.
    w.layers[x.fold].folded.append(name)
    return [_Info(act=True, src=x.src, depth=x.depth, zero=zero, fold=x.fold)]
  if x.chain is None:  # A standalone affine op (e.g. pre-activation BatchNorm).
    w.chains.append(_Chain(channels=c.psize, size=out_size, src=x.src))
    chain = len(w.chains) - 1
  else:
    chain = x.chain
  rec = w.chains[chain]
  rec.channels = max(rec.channels, c.psize)
  rec.size = out_size
  if name in ('mul', 'div'):
    rec.mul = True
  else:
    rec.add = True
  return [_Info(act=True, src=x.src, depth=x.depth, zero=zero, chain=chain)]


def _layer_or_matmul(w: _Walker, eqn: Any, ins: list[_Info]) -> list[_Info]:
  """A convolution or dot product: a `Layer` if one operand is a kernel leaf."""
  name = eqn.primitive.name
  lhs, rhs = ins[0], ins[1]
  if lhs.act and rhs.act or not (lhs.leaf or rhs.leaf):
    macs = jaxprs.eqn_macs(eqn)
    out_size = _size(eqn.outvars[0].aval)
    main = lhs if lhs.depth >= rhs.depth else rhs
    w.ops.append(Op('matmul', name, out_size, macs, macs - out_size))
    w.warnings.append(f'{name} without a parameter kernel counted as a full-precision matmul')
    return [_Info(act=True, src=main.src, depth=max(lhs.depth, rhs.depth))]
  if name == 'conv_general_dilated':
    x = lhs
    layer = _conv(w, eqn, x, rhs.leaf)
  else:
    kernel_is_rhs = rhs.leaf is not None and not rhs.act
    x, leaf = (lhs, rhs.leaf) if kernel_is_rhs else (rhs, lhs.leaf)
    layer = _dense(w, eqn, x, leaf, kernel_is_rhs)
  if x.chain is not None:
    layer.after_affine = True
  w.layers.append(layer)
  # Output channels that are identically zero: all-zero filters over the live inputs.
  return [
    _Info(
      act=True,
      src=layer.index,
      fold=layer.index,
      depth=layer.depth,
      zero=layer.zero_filters(),
      chain=None,
    )
  ]


def _conv(w: _Walker, eqn: Any, x: _Info, leaf: str) -> Layer:
  lhs_spec, rhs_spec, out_spec = eqn.params['dimension_numbers']
  if eqn.params.get('batch_group_count', 1) != 1:
    w.warnings.append(f'{leaf}: batch_group_count != 1 is counted as groups=1')
  in_shape = tuple(eqn.invars[0].aval.shape)
  out_shape = tuple(eqn.outvars[0].aval.shape)
  kshape = tuple(eqn.invars[1].aval.shape)
  value = w.values.get(leaf)
  shape_oi = tuple(kshape[d] for d in rhs_spec)
  groups = int(eqn.params.get('feature_group_count', 1))
  c_in = in_shape[lhs_spec[1]]
  channels_last = x.zero is not None and lhs_spec[1] == len(in_shape) - 1
  layer = Layer(
    index=len(w.layers),
    name=leaf,
    kind='depthwise' if groups > 1 and groups == c_in and shape_oi[1] == 1 else 'conv',
    kernel=None if value is None else np.transpose(value, rhs_spec),
    kernel_shape=kshape,
    groups=groups,
    in_shape=in_shape,
    out_shape=out_shape,
    positions=math.prod(out_shape[d] for d in out_spec[2:]) * out_shape[out_spec[0]],
    in_side=in_shape[lhs_spec[2]] if len(lhs_spec) > 2 else 1,
    stride=int(eqn.params['window_strides'][0]) if eqn.params['window_strides'] else 1,
    pad=int(eqn.params['padding'][0][0]) if eqn.params['padding'] else 0,
    zero_in=x.zero if channels_last else None,
    depth=x.depth + 1,
    shape_oi=shape_oi,
  )
  if any(d != 1 for d in tuple(eqn.params.get('lhs_dilation', ())) or ()):
    w.warnings.append(f'{leaf}: input dilation (transposed conv) counted as a plain conv')
  return layer


def _dense(w: _Walker, eqn: Any, x: _Info, leaf: str, kernel_is_rhs: bool) -> Layer:
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  k_pos = 1 if kernel_is_rhs else 0
  kshape = tuple(eqn.invars[k_pos].aval.shape)
  contract = tuple(rc if kernel_is_rhs else lc)
  batch = tuple(rb if kernel_is_rhs else lb)
  if batch:
    w.warnings.append(f'{leaf}: batched dot_general counted per batch element')
  free = tuple(d for d in range(len(kshape)) if d not in contract and d not in batch)
  c_out = math.prod(kshape[d] for d in free)
  c_in = math.prod(kshape[d] for d in contract)
  value = w.values.get(leaf)
  kernel = None
  if value is not None:
    kernel = np.transpose(value, free + contract + batch).reshape(c_out, c_in, -1)[:, :, 0]
  in_shape = tuple(eqn.invars[1 - k_pos].aval.shape)
  x_contract = tuple(lc if kernel_is_rhs else rc)
  zero_in = None
  if x.zero is not None and x_contract == (len(in_shape) - 1,) and len(x.zero) == c_in:
    zero_in = x.zero
  return Layer(
    index=len(w.layers),
    name=leaf,
    kind='dense',
    kernel=kernel,
    kernel_shape=kshape,
    groups=1,
    in_shape=in_shape,
    out_shape=tuple(eqn.outvars[0].aval.shape),
    positions=max(_size(eqn.outvars[0].aval) // max(c_out, 1), 1),
    in_side=1,
    stride=1,
    pad=0,
    zero_in=zero_in,
    depth=x.depth + 1,
    shape_oi=(c_out, c_in),
  )


_HANDLERS: dict[str, _Handler] = {
  'conv_general_dilated': _layer_or_matmul,
  'dot_general': _layer_or_matmul,
  **dict.fromkeys(_MOVES, _move),
  **dict.fromkeys(_BINARY, _binary),
  # Sigmoid: 2 multiplications and 1 addition per element (docs/scoring.md, rule 7).
  'logistic': _elementwise('activation', 2, 1, keeps_zero=False),
  **{
    name: _elementwise('activation', 1, 0, keeps_zero=name in ('tanh', 'sqrt', 'integer_pow'))
    for name in _TRANSCENDENTAL | {'integer_pow'}
  },
  **{name: _elementwise(None, 0, 0, keeps_zero=name != 'argmax') for name in _FREE},
  **dict.fromkeys(_COMPARE, _elementwise('compare', 0, 1, keeps_zero=False)),
  **dict.fromkeys(_REDUCE, _reduce),
  **dict.fromkeys(_WINDOW, _window),
}


# --- entry point -------------------------------------------------------------------------------


def batch_one(input_shape: Sequence[int]) -> tuple[int, ...]:
  """``(H, W, C)`` or ``(1, H, W, C)`` -> ``(1, H, W, C)``.

  Raises:
    ValueError: for any other shape (the counts are for one example).
  """
  shape = tuple(int(d) for d in input_shape)
  if len(shape) == 3:
    return (1, *shape)
  if len(shape) == 4 and shape[0] == 1:
    return shape
  raise ValueError(
    f'input_shape must be (H, W, C) or (1, H, W, C) for one example, got {tuple(input_shape)}'
  )


def _concrete(leaf: Any) -> np.ndarray | None:
  """A leaf's values, or None for an abstract leaf (`jax.ShapeDtypeStruct`)."""
  if isinstance(leaf, jax.ShapeDtypeStruct) or not hasattr(leaf, '__array__'):
    return None
  return np.asarray(jax.device_get(leaf))


def trace(model: Any, variables: Any, input_shape: Sequence[int]) -> Graph:
  """Traces one eval-mode forward pass into layers and other ops (nothing is compiled).

  Args:
    model: a linen module applied as ``model.apply(variables, x, train=False)``.
    variables: ``{'params': ..., 'batch_stats': ...}`` (arrays, or
      ``jax.ShapeDtypeStruct`` when only shapes are known).
    input_shape: ``(H, W, C)`` or ``(1, H, W, C)``.

  Returns:
    A `Graph` whose layers are in call order.
  """
  shape = batch_one(input_shape)
  leaves = [
    (tree_util.strip_collection(name), leaf) for name, leaf in tree_util.named_leaves(variables)
  ]
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), v.dtype), variables)
  closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(abstract, x)
  walker = _Walker({name: _concrete(leaf) for name, leaf in leaves})
  inputs = [
    _Info(param=True, leaf=name, psize=max(int(np.prod(np.shape(leaf))), 1))
    for name, leaf in leaves
  ]
  walker.walk(closed.jaxpr, [*inputs, _Info(act=True)])
  return walker.graph()
