"""Parameter and operation counts of a (ternary) network under the MicroNet challenge rules.

EC2T (Marban, Becking, Wiedemann & Samek, "Learning Sparse & Ternary Neural
Networks with Entropy-Constrained Trained Ternarization", CVPR Workshops 2020,
arXiv 2004.01077, §4 and docs/algorithm.md §10) reports every network's cost in the units
of the NeurIPS 2019 MicroNet challenge: parameters and operations in "32-bit
equivalents" (an item of ``b`` bits counts ``b/32``), and the score

    score = params / P_ref + flops / F_ref

with WRN-28-10 as the CIFAR reference (36.5M, 10.49G) and MobileNetV2-1.4 as
the ImageNet reference (6.9M, 1170M). ``docs/scoring.md`` gives the
rules in full.

Nothing here is tabulated per architecture. `trace` turns one eval-mode
forward pass (``model.apply(variables, x, train=False)``) into a jaxpr and
walks it: every ``conv_general_dilated`` / ``dot_general`` whose kernel is a
leaf of the variables (matched by the identity of the jaxpr input variable) is
a layer; BatchNorm and biases are the elementwise ops with a parameter operand
(folded into the layer they follow, or standalone when they follow no layer);
residual additions are additions of two activations; activations, pooling and
the rest are the remaining ops on activations. The values of the variables
then give each kernel's sparsity, dead channels and ternary structure.

Two modes:

* ``'corrected'`` (default) counts every operation of the network: a dead
  channel is an all-zero filter, and zero channels are followed through the
  true data flow (residual additions included); every residual addition,
  projection shortcut, pooling and activation counts; a ternary filter with
  ``n+`` positive and ``n-`` negative taps costs two adder trees (a true tree:
  ``m - 1`` additions for ``m`` values, widening by one bit per level) plus one
  addition and at most two multiplications per output; a BatchNorm scale that
  follows a ternary layer makes its two centroids per-channel values.
* ``'reference'`` reproduces the published counter, quirks included: a dead
  channel is a filter that *sums* to zero, dead inputs are the dead outputs of
  the previous layer in the list of body convolutions (the residual path is
  ignored), only the last residual addition counts, 1x1 projection shortcuts,
  pooling and the classifier's ReLU are not counted, the tree adder starts at
  ``vl - 1`` and stops at ``n > 1`` with the layer's average vector length
  ``vl``, the output side is ``ceil(ceil(in/stride) + 2·pad - k + 1)``, and
  pyramidal (MicroNet) blocks charge their first BatchNorm and their single
  ReLU by the position of the convolution in that list. Scoring parameters are
  truncated to integers per group (stem, body, classifier), as published.

Example:
  >>> from ec2t_jax import models, scoring
  >>> model = models.create('resnet20', num_classes=10)
  >>> x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)  # values: dense FP
  >>> r = scoring.count(model, variables, input_shape=(32, 32, 3), mode='reference',
  ...                   mul_bits=32, half_precision=False)
  >>> round(r.totals['mults'] / 1e6, 1), round(r.totals['adds'] / 1e6, 1)
  (40.7, 40.6)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from ec2t_jax import models, tree_util

__all__ = [
  'MODES',
  'REFERENCE_NETWORKS',
  'Graph',
  'Layer',
  'Op',
  'Report',
  'Row',
  'count',
  'is_ternary',
  'reference_for',
  'trace',
]

MODES = ('corrected', 'reference')

# (P_ref, F_ref): WRN-28-10 for CIFAR-10/100, MobileNetV2-1.4 for ImageNet (docs/scoring.md).
REFERENCE_NETWORKS = {
  'cifar': (36.5e6, 10.49e9),
  'imagenet': (6.9e6, 1170e6),
}

# Primitives whose sub-jaxpr is a plain function call (inlined by the walk).
_CALLS = frozenset(
  {
    'pjit',
    'jit',
    'closed_call',
    'core_call',
    'custom_jvp_call',
    'custom_vjp_call',
    'custom_vjp_call_jaxpr',
    'remat',
    'checkpoint',
  }
)
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
_FREE = frozenset({'neg', 'abs', 'sign', 'iota', 'argmax', 'argmin'})
_TRANSCENDENTAL = frozenset(
  {'exp', 'exp2', 'log', 'log1p', 'expm1', 'tanh', 'rsqrt', 'sqrt', 'erf', 'sin', 'cos', 'pow'}
)
_COMPARE = frozenset({'gt', 'ge', 'lt', 'le', 'eq', 'ne'})
_REDUCE = frozenset({'reduce_sum', 'reduce_max', 'reduce_min', 'reduce_prod'})
_WINDOW = frozenset(
  {'reduce_window_max', 'reduce_window_min', 'reduce_window_sum', 'reduce_window'}
)


# --- tracing -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Layer:
  """One convolution or dense layer found in the traced forward pass.

  Attributes:
    index: position in call order.
    name: the kernel's path in the variables, without the collection
      (e.g. ``'layer1_0/conv1/kernel'``).
    kind: ``'conv'``, ``'depthwise'`` or ``'dense'``.
    kernel: the kernel values as ``(out, in per group, *spatial)``, or None if
      the variables were abstract.
    kernel_shape: the kernel's shape as stored in the variables.
    groups: ``feature_group_count`` of a convolution (1 for dense).
    in_shape: shape of the layer's input activation (batch 1).
    out_shape: shape of its output.
    positions: output positions per filter (output elements / output channels).
    in_side: input side along the first spatial dimension (1 for dense).
    stride: stride along the first spatial dimension.
    pad: low padding along the first spatial dimension.
    zero_in: bool per input channel, True where the input is identically zero
      along the true data flow (None when unknown).
    depth: layers on the longest path from the input to this layer's output.
    folded: primitives of the parameter-operand elementwise ops that follow the
      layer directly (bias, BatchNorm): foldable into its bias and kernel.
    activation: the first activation applied on the layer's main path.
    projection: True for a convolution on the short branch of a residual
      addition (a projection shortcut).
    shape_oi: the kernel shape as ``(out, in per group, *spatial)``.
    after_affine: True if the layer's input went through a standalone
      parameter-operand affine op (the pre-activation BatchNorm of a pyramidal block).
  """

  index: int
  name: str
  kind: str
  kernel: np.ndarray | None
  kernel_shape: tuple[int, ...]
  groups: int
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  positions: int
  in_side: int
  stride: int
  pad: int
  zero_in: np.ndarray | None
  depth: int
  shape_oi: tuple[int, ...] = ()
  folded: list[str] = dataclasses.field(default_factory=list)
  activation: str | None = None
  projection: bool = False
  after_affine: bool = False

  @property
  def c_out(self) -> int:
    """Output channels (filters) before removing dead ones."""
    return self.shape_oi[0]


@dataclasses.dataclass
class Op:
  """An operation on activations other than a layer (raw counts, not weighted by bits).

  Attributes:
    kind: ``'residual'``, ``'add'``, ``'activation'``, ``'pool'``, ``'affine'``,
      ``'scale'``, ``'matmul'``, ``'compare'`` or ``'uncounted'``.
    primitive: the jaxpr primitive (``'max'``, ``'logistic'``, ``'reduce_sum'``, ...).
    size: output elements.
    mults: multiplications.
    adds: additions.
    params: parameter values it needs (standalone affine ops).
    src: index of the layer it follows on the main path, or None.
  """

  kind: str
  primitive: str
  size: int
  mults: float = 0.0
  adds: float = 0.0
  params: int = 0
  src: int | None = None


@dataclasses.dataclass
class Graph:
  """The result of `trace`: layers in call order, other ops, and what was not understood."""

  layers: list[Layer]
  ops: list[Op]
  warnings: list[str]


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
  mul: bool = False
  add: bool = False
  channels: int = 0
  size: int = 0
  src: int | None = None


def _sub_call(eqn: Any) -> Any | None:
  """The jaxpr of a call-like equation whose inputs/outputs map one to one, else None."""
  if eqn.primitive.name not in _CALLS:
    return None
  for key in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    sub = eqn.params.get(key)
    if sub is None:
      continue
    closed = sub if hasattr(sub, 'consts') else None
    inner = sub.jaxpr if hasattr(sub, 'jaxpr') and hasattr(sub.jaxpr, 'eqns') else sub
    if (
      hasattr(inner, 'eqns')
      and len(inner.invars) == len(eqn.invars)
      and len(inner.outvars) == len(eqn.outvars)
    ):
      return closed if closed is not None else inner
  return None


def _has_sub_jaxpr(eqn: Any) -> bool:
  for value in eqn.params.values():
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      if hasattr(v, 'eqns') or (hasattr(v, 'jaxpr') and hasattr(v.jaxpr, 'eqns')):
        return True
  return False


def _size(aval: Any) -> int:
  return int(math.prod(getattr(aval, 'shape', ())))


def _leaf_values(tree: Any) -> dict[str, np.ndarray | None]:
  out = {}
  for name, leaf in tree_util.named_leaves(tree):
    if isinstance(leaf, jax.ShapeDtypeStruct) or not hasattr(leaf, '__array__'):
      out[name] = None
    else:
      out[name] = np.asarray(jax.device_get(leaf))
  return out


class _Walker:
  """Walks a jaxpr once, classifying every equation (see the module docstring)."""

  def __init__(self, values: Mapping[str, np.ndarray | None]):
    self.values = values
    self.layers: list[Layer] = []
    self.ops: list[Op] = []
    self.chains: list[_Chain] = []
    self.warnings: list[str] = []

  # Reading ---------------------------------------------------------------------------------

  @staticmethod
  def read(env: dict[Any, _Info], var: Any) -> _Info:
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
      sub = _sub_call(eqn)
      if sub is not None:
        inner = sub.jaxpr if hasattr(sub, 'consts') else sub
        outs = self.walk(inner, ins)
      else:
        outs = self.equation(eqn, ins)
      for var, info in zip(eqn.outvars, outs, strict=True):
        env[var] = info
    return [self.read(env, v) for v in jaxpr.outvars]

  # One equation ----------------------------------------------------------------------------

  def equation(self, eqn: Any, ins: list[_Info]) -> list[_Info]:
    name = eqn.primitive.name
    outs = eqn.outvars
    acts = [i for i in ins if i.act]
    if not acts:  # Parameter-side arithmetic (e.g. rsqrt(var + eps) * scale): folded offline.
      param = any(i.param for i in ins)
      leaf = ins[0].leaf if name in ('convert_element_type', 'copy', 'copy_p') and ins else None
      psize = max([i.psize for i in ins] or [1])
      return [
        _Info(param=param, leaf=leaf, psize=min(psize, _size(v.aval)) or 1, literal=None)
        for v in outs
      ]
    if _has_sub_jaxpr(eqn):
      self.warnings.append(f'{name}: control flow on activations is not counted')
      return [self._plain(acts, v) for v in outs]
    if name in ('conv_general_dilated', 'dot_general'):
      return [self._layer_or_matmul(eqn, ins)]
    if name in _MOVES:
      return [self._move(eqn, ins)]
    out_size = _size(outs[0].aval)
    main = max(acts, key=lambda i: i.depth)
    if len(ins) == 2 and name in ('add', 'sub', 'mul', 'div', 'max', 'min'):
      return [self._binary(eqn, ins, out_size)]
    if name == 'logistic':
      self.ops.append(Op('activation', name, out_size, 2 * out_size, out_size, src=main.src))
      return [self._plain(acts, outs[0])]
    if name in _TRANSCENDENTAL or name == 'integer_pow':
      self.ops.append(Op('activation', name, out_size, out_size, 0, src=main.src))
      zero = main.zero if name in ('tanh', 'sqrt', 'integer_pow') else None
      return [self._plain(acts, outs[0], zero=zero)]
    if name in _FREE:
      return [self._plain(acts, outs[0], zero=main.zero if name != 'argmax' else None)]
    if name in _COMPARE:
      self.ops.append(Op('compare', name, out_size, 0, out_size, src=main.src))
      return [self._plain(acts, outs[0])]
    if name in _REDUCE:
      in_size = _size(eqn.invars[0].aval)
      axes = tuple(eqn.params.get('axes', ()))
      ndim = len(eqn.invars[0].aval.shape)
      self.ops.append(Op('pool', name, out_size, 0, in_size - out_size, src=main.src))
      keep = main.zero if ndim - 1 not in axes else None
      return [self._plain(acts, outs[0], zero=keep)]
    if name in _WINDOW:
      window = math.prod(eqn.params.get('window_dimensions', (1,)))
      self.ops.append(Op('pool', name, out_size, 0, out_size * (window - 1), src=main.src))
      return [self._plain(acts, outs[0], zero=main.zero)]
    self.warnings.append(f'{name}: unknown primitive on activations, not counted')
    self.ops.append(Op('uncounted', name, out_size, src=main.src))
    return [self._plain(acts, v) for v in outs]

  @staticmethod
  def _plain(acts: list[_Info], var: Any, zero: np.ndarray | None = None) -> _Info:
    main = max(acts, key=lambda i: i.depth)
    return _Info(act=True, src=main.src, depth=main.depth, zero=zero)

  def _move(self, eqn: Any, ins: list[_Info]) -> _Info:
    """Data movement on an activation: no cost; follows zero channels where it can."""
    name = eqn.primitive.name
    x = ins[0]  # The operand of every move below except select_n / concatenate.
    main = max((i for i in ins if i.act), key=lambda i: i.depth)
    in_shape = tuple(eqn.invars[0].aval.shape)
    out_shape = tuple(eqn.outvars[0].aval.shape)
    zero = None
    if name in ('convert_element_type', 'copy', 'copy_p', 'reduce_precision'):
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
    keeps_layer = name in ('convert_element_type', 'copy', 'copy_p') or (
      name == 'reshape' and in_shape[-1:] == out_shape[-1:]
    )
    return _Info(
      act=True,
      src=main.src,
      depth=main.depth,
      zero=zero,
      fold=x.fold if keeps_layer and x.act else None,
      chain=x.chain if keeps_layer and x.act else None,
    )

  def _binary(self, eqn: Any, ins: list[_Info], out_size: int) -> _Info:
    name = eqn.primitive.name
    a, b = ins
    if a.act and b.act:
      main, other = (a, b) if a.depth >= b.depth else (b, a)
      zero = None
      if a.zero is not None and b.zero is not None and len(a.zero) == len(b.zero):
        zero = (a.zero & b.zero) if name in ('add', 'sub', 'max', 'min') else (a.zero | b.zero)
      if name in ('add', 'sub'):
        same = tuple(eqn.invars[0].aval.shape) == tuple(eqn.invars[1].aval.shape)
        kind = 'residual' if same else 'add'
        self.ops.append(Op(kind, name, out_size, 0, out_size, src=main.src))
        if same and other.depth < main.depth and other.fold is not None:
          self.layers[other.fold].projection = True
      elif name in ('mul', 'div'):
        self.ops.append(Op('activation', name, out_size, out_size, 0, src=main.src))
      else:
        self.ops.append(Op('compare', name, out_size, 0, out_size, src=main.src))
      return _Info(act=True, src=main.src, depth=main.depth, zero=zero)
    x, c = (a, b) if a.act else (b, a)
    if name in ('max', 'min'):  # ReLU, clipping.
      value = c.literal
      keep = value is not None and float(value) == 0.0
      self.ops.append(Op('activation', 'relu' if keep else name, out_size, out_size, 0, src=x.src))
      if x.src is not None and self.layers[x.src].activation is None:
        self.layers[x.src].activation = 'relu' if keep else name
      return _Info(act=True, src=x.src, depth=x.depth, zero=x.zero if keep else None)
    keeps_zero = name == 'mul' or (name == 'div' and x is a)  # 0·c = 0/c = 0.
    zero = x.zero if keeps_zero else None
    if not c.param:  # A constant (e.g. 1/HW of a mean): one op per element unless folded.
      if x.fold is not None:
        return _Info(act=True, src=x.src, depth=x.depth, zero=zero, fold=x.fold)
      mults = out_size if name in ('mul', 'div') else 0
      self.ops.append(Op('scale', name, out_size, mults, out_size - mults, src=x.src))
      return _Info(act=True, src=x.src, depth=x.depth, zero=zero)
    if x.fold is not None:  # Bias / BatchNorm right after a layer: folded into it.
      self.layers[x.fold].folded.append(name)
      return _Info(act=True, src=x.src, depth=x.depth, zero=zero, fold=x.fold)
    if x.chain is None:  # A standalone affine op (e.g. pre-activation BatchNorm).
      self.chains.append(_Chain(channels=c.psize, size=out_size, src=x.src))
      chain = len(self.chains) - 1
    else:
      chain = x.chain
    rec = self.chains[chain]
    rec.channels = max(rec.channels, c.psize)
    rec.size = out_size
    if name in ('mul', 'div'):
      rec.mul = True
    else:
      rec.add = True
    return _Info(act=True, src=x.src, depth=x.depth, zero=zero, chain=chain)

  def _layer_or_matmul(self, eqn: Any, ins: list[_Info]) -> _Info:
    name = eqn.primitive.name
    lhs, rhs = ins[0], ins[1]
    out_aval = eqn.outvars[0].aval
    if lhs.act and rhs.act or not (lhs.leaf or rhs.leaf):
      macs = _macs(eqn)
      main = lhs if lhs.depth >= rhs.depth else rhs
      self.ops.append(Op('matmul', name, _size(out_aval), macs, macs - _size(out_aval)))
      self.warnings.append(f'{name} without a parameter kernel counted as a full-precision matmul')
      return _Info(act=True, src=main.src, depth=max(lhs.depth, rhs.depth))
    if name == 'conv_general_dilated':
      x, leaf = lhs, rhs.leaf
      layer = self._conv(eqn, x, leaf)
    else:
      kernel_is_rhs = rhs.leaf is not None and not rhs.act
      x, leaf = (lhs, rhs.leaf) if kernel_is_rhs else (rhs, lhs.leaf)
      layer = self._dense(eqn, x, leaf, kernel_is_rhs)
    if x.chain is not None:
      layer.after_affine = True
    self.layers.append(layer)
    # Output channels that are identically zero: all-zero filters over the live inputs.
    zero_out = None
    if layer.kernel is not None:
      zero_out = ~np.any(_live_kernel(layer) != 0, axis=tuple(range(1, layer.kernel.ndim)))
    return _Info(
      act=True, src=layer.index, fold=layer.index, depth=layer.depth, zero=zero_out, chain=None
    )

  def _conv(self, eqn: Any, x: _Info, leaf: str) -> Layer:
    lhs_spec, rhs_spec, out_spec = eqn.params['dimension_numbers']
    if eqn.params.get('batch_group_count', 1) != 1:
      self.warnings.append(f'{leaf}: batch_group_count != 1 is counted as groups=1')
    in_shape = tuple(eqn.invars[0].aval.shape)
    out_shape = tuple(eqn.outvars[0].aval.shape)
    kshape = tuple(eqn.invars[1].aval.shape)
    value = self.values.get(leaf)
    kernel = None
    if value is not None:
      kernel = np.transpose(value, rhs_spec)
    shape_oi = tuple(kshape[d] for d in rhs_spec)
    groups = int(eqn.params.get('feature_group_count', 1))
    c_in = in_shape[lhs_spec[1]]
    kind = 'depthwise' if groups > 1 and groups == c_in and shape_oi[1] == 1 else 'conv'
    positions = math.prod(out_shape[d] for d in out_spec[2:]) * out_shape[out_spec[0]]
    zero_in = x.zero if (x.zero is not None and lhs_spec[1] == len(in_shape) - 1) else None
    layer = Layer(
      index=len(self.layers),
      name=leaf,
      kind=kind,
      kernel=kernel,
      kernel_shape=kshape,
      groups=groups,
      in_shape=in_shape,
      out_shape=out_shape,
      positions=positions,
      in_side=in_shape[lhs_spec[2]] if len(lhs_spec) > 2 else 1,
      stride=int(eqn.params['window_strides'][0]) if eqn.params['window_strides'] else 1,
      pad=int(eqn.params['padding'][0][0]) if eqn.params['padding'] else 0,
      zero_in=zero_in,
      depth=x.depth + 1,
      shape_oi=shape_oi,
    )
    if any(d != 1 for d in tuple(eqn.params.get('lhs_dilation', ())) or ()):
      self.warnings.append(f'{leaf}: input dilation (transposed conv) counted as a plain conv')
    return layer

  def _dense(self, eqn: Any, x: _Info, leaf: str, kernel_is_rhs: bool) -> Layer:
    (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
    k_pos = 1 if kernel_is_rhs else 0
    kshape = tuple(eqn.invars[k_pos].aval.shape)
    contract = tuple(rc if kernel_is_rhs else lc)
    batch = tuple(rb if kernel_is_rhs else lb)
    if batch:
      self.warnings.append(f'{leaf}: batched dot_general counted per batch element')
    free = tuple(d for d in range(len(kshape)) if d not in contract and d not in batch)
    c_out = math.prod(kshape[d] for d in free)
    c_in = math.prod(kshape[d] for d in contract)
    value = self.values.get(leaf)
    kernel = None
    if value is not None:
      kernel = np.transpose(value, free + contract + batch).reshape(c_out, c_in, -1)[:, :, 0]
    in_shape = tuple(eqn.invars[1 - k_pos].aval.shape)
    out_shape = tuple(eqn.outvars[0].aval.shape)
    x_contract = tuple(lc if kernel_is_rhs else rc)
    zero_in = None
    if x.zero is not None and x_contract == (len(in_shape) - 1,) and len(x.zero) == c_in:
      zero_in = x.zero
    layer = Layer(
      index=len(self.layers),
      name=leaf,
      kind='dense',
      kernel=kernel,
      kernel_shape=kshape,
      groups=1,
      in_shape=in_shape,
      out_shape=out_shape,
      positions=max(_size(eqn.outvars[0].aval) // max(c_out, 1), 1),
      in_side=1,
      stride=1,
      pad=0,
      zero_in=zero_in,
      depth=x.depth + 1,
      shape_oi=(c_out, c_in),
    )
    return layer


def _macs(eqn: Any) -> int:
  out = _size(eqn.outvars[0].aval)
  if eqn.primitive.name == 'conv_general_dilated':
    rhs = eqn.invars[1].aval.shape
    _, rhs_spec, _ = eqn.params['dimension_numbers']
    return out * math.prod(rhs[d] for d in rhs_spec[1:])
  (lc, _), _ = eqn.params['dimension_numbers']
  return out * math.prod(eqn.invars[0].aval.shape[d] for d in lc)


def _input_channel_index(layer: Layer) -> np.ndarray:
  """``(out, in per group)`` -> index of the input channel each kernel column reads."""
  c_out, i_per_group = layer.shape_oi[:2]
  per_group = max(c_out // layer.groups, 1)
  group = np.arange(c_out) // per_group
  return group[:, None] * i_per_group + np.arange(i_per_group)[None, :]


def _live_kernel(layer: Layer) -> np.ndarray:
  """The kernel with the columns that read identically-zero inputs set to zero."""
  k = layer.kernel
  if layer.zero_in is None or k is None:
    return k
  dead = layer.zero_in[_input_channel_index(layer)]
  return np.where(dead.reshape(dead.shape + (1,) * (k.ndim - 2)), 0.0, k)


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
  shape = _batch_one(input_shape)
  flat, _ = jax.tree_util.tree_flatten_with_path(variables)
  names = [tree_util.path_str(p) for p, _ in flat]
  values = _leaf_values(variables)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), v.dtype), variables)
  closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(abstract, x)
  walker = _Walker({_strip(n): values[n] for n in names})
  inputs = [
    _Info(param=True, leaf=_strip(n), psize=max(int(np.prod(np.shape(leaf))), 1))
    for n, (_, leaf) in zip(names, flat, strict=True)
  ]
  inputs.append(_Info(act=True))
  walker.walk(closed.jaxpr, inputs)
  for chain in walker.chains:
    mults = chain.size if chain.mul else 0
    adds = chain.size if chain.add else 0
    params = chain.channels * (int(chain.mul) + int(chain.add))
    walker.ops.append(Op('affine', 'batchnorm', chain.size, mults, adds, params, chain.src))
  return Graph(walker.layers, walker.ops, sorted(set(walker.warnings)))


def _strip(name: str) -> str:
  """``'params/conv1/kernel'`` -> ``'conv1/kernel'`` (other collections keep their prefix)."""
  return name[len('params/') :] if name.startswith('params/') else name


def _batch_one(input_shape: Sequence[int]) -> tuple[int, ...]:
  shape = tuple(int(d) for d in input_shape)
  if len(shape) == 3:
    return (1, *shape)
  if len(shape) == 4 and shape[0] == 1:
    return shape
  raise ValueError(
    f'input_shape must be (H, W, C) or (1, H, W, C) for one example, got {tuple(input_shape)}'
  )


# --- counting ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
  """One line of a `Report`; costs in 32-bit equivalents.

  Layer rows (kind ``'conv'``, ``'depthwise'``, ``'dense'``) describe the
  weights and the multiply-accumulates of one layer; the bias (folded
  BatchNorm) and the activation of a layer, residual additions, pooling,
  standalone affine ops and matmuls between activations get rows of their own.

  Attributes:
    name: kernel path, or ``'<layer> (bias)'``, ``'relu after <layer>'``, ...
    kind: ``'conv'``, ``'depthwise'``, ``'dense'``, ``'bias'``, ``'activation'``,
      ``'residual'``, ``'pool'``, ``'affine'``, ``'matmul'``, ``'add'``,
      ``'compare'``, ``'scale'``.
    shape: the kernel shape as stored (layer rows), or the output shape.
    N: kernel elements after removing dead channels.
    nnz: non-zero elements of those.
    sparsity: ``1 - nnz/N``.
    ternary: the kernel is ternary (values or mask).
    params: scoring parameters.
    mults: multiplications (weighted by ``mul_bits/32``).
    adds: additions (``add_bits/32``, or the adder tree's bits / 32).
    dead_out: dead output channels removed.
    dead_in: dead input channels removed.
    c_in: input channels after removal.
    c_out: output channels after removal.
    positions: output positions per filter.
    storage: the cheapest storage format of the layer (``'sparse-fp'``,
      ``'dense-fp'``, ``'two-masks'``, ``'mask+sign'``, ``'csr'``, ``'cer'``).
    group: ``'stem'``, ``'body'``, ``'fc'``, ``'projection'``, ``'other'``
      (reference mode truncates scoring params per group).
    counted: False for what the reference mode leaves out.
  """

  name: str
  kind: str
  shape: tuple[int, ...] = ()
  N: int = 0
  nnz: int = 0
  sparsity: float = 0.0
  ternary: bool = False
  params: float = 0.0
  mults: float = 0.0
  adds: float = 0.0
  dead_out: int = 0
  dead_in: int = 0
  c_in: int = 0
  c_out: int = 0
  positions: int = 0
  storage: str = ''
  group: str = 'other'
  counted: bool = True


@dataclasses.dataclass
class Report:
  """The result of `count`.

  Attributes:
    rows: per-layer and per-op costs.
    totals: ``params``, ``mults``, ``adds``, ``flops`` (32-bit equivalents),
      ``score``, ``P_ref``, ``F_ref``, and ``macs`` (plain multiply-accumulates
      of the layers, for reference).
    mode: ``'corrected'`` or ``'reference'``.
    settings: the bit widths and switches used.
    warnings: traced operations that could not be counted exactly.
  """

  rows: list[Row]
  totals: dict[str, float]
  mode: str
  settings: dict[str, Any]
  warnings: list[str] = dataclasses.field(default_factory=list)

  @property
  def layer_rows(self) -> list[Row]:
    return [r for r in self.rows if r.kind in ('conv', 'depthwise', 'dense')]

  def format(self) -> str:
    """A fixed-width table of the layers, the other ops by kind, and the totals."""
    head = (
      f'{"layer":<34} {"kind":<9} {"N":>9} {"sparsity":>8} {"T":>1} {"storage":>9} '
      f'{"params":>10} {"mults":>12} {"adds":>12} {"dead o/i":>9}'
    )
    lines = [head, '-' * len(head)]
    for r in self.layer_rows:
      name = r.name if r.counted else f'({r.name})'
      lines.append(
        f'{name[-34:]:<34} {r.kind:<9} {r.N:>9,d} {100 * r.sparsity:>7.1f}% '
        f'{"T" if r.ternary else "-":>1} {r.storage:>9} {r.params:>10,.1f} {r.mults:>12,.0f} '
        f'{r.adds:>12,.0f} {f"{r.dead_out}/{r.dead_in}":>9}'
      )
    by_kind: dict[str, list[float]] = {}
    for r in self.rows:
      if r.kind in ('conv', 'depthwise', 'dense') or not r.counted:
        continue
      acc = by_kind.setdefault(r.kind, [0.0, 0.0, 0.0, 0])
      acc[0] += r.params
      acc[1] += r.mults
      acc[2] += r.adds
      acc[3] += 1
    lines.append('-' * len(head))
    for kind, (p, m, a, n) in sorted(by_kind.items()):
      label = f'{kind} ({n} ops)'
      lines.append(
        f'{label:<34} {"":<9} {"":>9} {"":>8} {"":>1} {"":>9} {p:>10,.1f} {m:>12,.0f} {a:>12,.0f}'
      )
    t = self.totals
    lines.append('-' * len(head))
    lines.append(
      f'total ({self.mode}): params {t["params"]:,.0f}, mults {t["mults"] / 1e6:.3f}M, '
      f'adds {t["adds"] / 1e6:.3f}M, FLOPs {t["flops"] / 1e6:.3f}M, '
      f'score {t["score"]:.5f} (P_ref {t["P_ref"]:.3g}, F_ref {t["F_ref"]:.4g})'
    )
    for w in self.warnings:
      lines.append(f'warning: {w}')
    return '\n'.join(lines)


def is_ternary(values: Any) -> bool:
  """True if every value is one of ``{-a, 0, +b}`` (``a, b > 0``; a subset counts).

  Example:
    >>> is_ternary(np.array([0.3, 0.0, -0.2, 0.3])), is_ternary(np.array([0.1, 0.2]))
    (True, False)
  """
  v = np.asarray(values)
  if v.size == 0 or not np.all(np.isfinite(v)):
    return False
  return np.unique(v[v > 0]).size <= 1 and np.unique(v[v < 0]).size <= 1


def reference_for(dataset: str | None, input_shape: Sequence[int]) -> tuple[float, float]:
  """``(P_ref, F_ref)`` of the MicroNet score for a dataset name or an input size.

  ImageNet (any name containing ``'imagenet'``, or inputs larger than 64
  pixels) uses MobileNetV2-1.4; everything else (CIFAR-10/100, and MNIST, which
  has no published reference) uses WRN-28-10.
  """
  if dataset:
    if 'imagenet' in dataset.lower():
      return REFERENCE_NETWORKS['imagenet']
    return REFERENCE_NETWORKS['cifar']
  side = _batch_one(input_shape)[1]
  return REFERENCE_NETWORKS['imagenet' if side > 64 else 'cifar']


def _tree_bits(n: float, width: int, stop: float) -> float:
  """Bits of an adder tree: ``n // 2`` additions per level, one bit wider per level (max 32)."""
  bits = 0.0
  while n > stop:
    bits += (n // 2) * width
    n = math.ceil(n / 2)
    width = min(width + 1, 32)
  return bits


def _formats(N: float, nnz: float, c_out: int, b: int, ternary: bool, n_cent: int) -> dict:
  """Scoring params of every applicable storage format (docs/scoring.md, rule 3)."""
  sparse = nnz * b / 32 + (N / 32 if nnz < N else 0.0)
  out = {'sparse-fp' if nnz < N else 'dense-fp': sparse}
  if ternary:
    cent = n_cent * b
    out['two-masks'] = math.ceil((2 * N + cent) / 32)
    out['mask+sign'] = math.ceil((N + nnz + cent) / 32)
    out['csr'] = math.ceil((nnz * (b + 1) + (c_out + 1) * b + cent) / 32)
    out['cer'] = math.ceil((nnz * b + 2 * (c_out + 1) * b + cent) / 32)
  return out


def _variables_dict(variables: Any) -> dict[str, Any]:
  if isinstance(variables, Mapping) and 'params' in variables:
    return {k: variables[k] for k in variables}
  return {'params': variables}


def _ternary_names(ternary_mask: Any) -> set[str]:
  if ternary_mask is None:
    return set()
  return {name for name, flag in tree_util.named_leaves(ternary_mask) if bool(flag)}


def _infer_num_classes(name: str, params: Any, shape: tuple[int, ...]) -> int:
  """The ``num_classes`` a registered model needs to have the shapes of ``params``."""
  probe = models.create(name, num_classes=1)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  ref = jax.eval_shape(lambda x: probe.init(jax.random.key(0), x, train=False), x)['params']
  got = dict(tree_util.named_leaves(params))
  for leaf_name, leaf in tree_util.named_leaves(ref):
    mine = got.get(leaf_name)
    if mine is not None and np.shape(mine) != leaf.shape:
      diff = [a for a, b in zip(np.shape(mine), leaf.shape, strict=False) if a != b]
      if diff:
        return int(diff[-1])
  return 1


def count(
  model_name_or_module: Any,
  variables: Any,
  *,
  input_shape: Sequence[int] | None = None,
  mode: str = 'corrected',
  mul_bits: int = 16,
  add_bits: int = 32,
  storage_bits: int = 16,
  half_precision: bool = True,
  tree_adder: bool = True,
  ternary_mask: Any = None,
  dataset: str | None = None,
) -> Report:
  """Counts scoring parameters, multiplications and additions of a network (docs/scoring.md).

  Args:
    model_name_or_module: a registered model name (``models.names()``) or a
      linen module applied as ``model.apply(variables, x, train=False)``.
    variables: ``{'params': ..., 'batch_stats': ...}`` (or just the params).
      Arrays give sparsity, dead channels and ternary structure;
      ``jax.ShapeDtypeStruct`` leaves count as dense full-precision kernels.
    input_shape: one input, ``(H, W, C)`` (default: the registered model's).
    mode: ``'corrected'`` (every op counted right) or ``'reference'`` (the
      published counter's rules and quirks).
    mul_bits: width of a multiplication (a multiplication counts ``mul_bits/32``).
    add_bits: width of an accumulation (``add_bits/32``).
    storage_bits: width of a stored value when ``half_precision``.
    half_precision: store values (and start adder trees) at ``storage_bits``
      instead of 32 bits.
    tree_adder: count a ternary layer's additions as an adder tree that widens
      by one bit per level from ``b`` to 32 bits, instead of ``add_bits`` each.
    ternary_mask: pytree of bools mirroring the params; True marks a ternary
      kernel whatever its values. Kernels with values exactly ``{-a, 0, +b}``
      are ternary anyway.
    dataset: picks the score's reference network (``'cifar10'``,
      ``'cifar100'``, ``'imagenet2012'``, ...); without it the input size decides.

  Returns:
    A `Report`.

  Raises:
    ValueError: for an unknown mode, model name or dataset, bad bit widths, or
      an input shape that is not one ``(H, W, C)`` example.

  Example:
    >>> r = count('lenet5', variables, input_shape=(28, 28, 1))  # doctest: +SKIP
    >>> r.totals['params'], r.totals['flops'], r.totals['score']  # doctest: +SKIP
  """
  if mode not in MODES:
    raise ValueError(f'mode must be one of {list(MODES)}, got {mode!r}')
  for label, bits in (
    ('mul_bits', mul_bits),
    ('add_bits', add_bits),
    ('storage_bits', storage_bits),
  ):
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 64:
      raise ValueError(f'{label} must be an integer in [1, 64], got {bits!r}')
  variables = _variables_dict(variables)
  if isinstance(model_name_or_module, str):
    name = model_name_or_module
    shape = _batch_one(input_shape if input_shape is not None else models.input_shape(name))
    num_classes = _infer_num_classes(name, variables['params'], shape)
    model = models.create(name, num_classes=num_classes)
  else:
    model = model_name_or_module
    if input_shape is None:
      raise ValueError('input_shape is required when a module (not a registered name) is given')
    shape = _batch_one(input_shape)
  p_ref, f_ref = reference_for(dataset, shape)
  graph = trace(model, variables, shape)
  if not graph.layers:
    raise ValueError('the traced forward pass has no convolution or dense layer with a kernel leaf')
  b = storage_bits if half_precision else 32
  marked = _ternary_names(ternary_mask)
  ternary = {
    layer.index: (
      layer.name in marked
      or f'params/{layer.name}' in marked
      or (layer.kernel is not None and is_ternary(layer.kernel))
    )
    for layer in graph.layers
  }
  for layer in graph.layers:
    if ternary[layer.index] and layer.kernel is None:
      raise ValueError(f'{layer.name} is marked ternary but its values are abstract; pass arrays')
  settings = dict(
    mul_bits=mul_bits,
    add_bits=add_bits,
    storage_bits=b,
    half_precision=half_precision,
    tree_adder=tree_adder,
    input_shape=shape,
    dataset=dataset,
  )
  counter = _reference if mode == 'reference' else _corrected
  rows = counter(graph, ternary, b=b, mul_bits=mul_bits, add_bits=add_bits, tree=tree_adder)
  totals = _totals(rows, mode)
  totals['macs'] = float(
    sum(math.prod(layer.shape_oi[1:]) * layer.c_out * layer.positions for layer in graph.layers)
  )
  totals['P_ref'], totals['F_ref'] = p_ref, f_ref
  totals['score'] = totals['params'] / p_ref + totals['flops'] / f_ref
  return Report(rows, totals, mode, settings, list(graph.warnings))


def _totals(rows: list[Row], mode: str) -> dict[str, float]:
  counted = [r for r in rows if r.counted]
  if mode == 'reference':  # The published counter truncates each group's scoring params.
    groups: dict[str, float] = {}
    for r in counted:
      groups[r.group] = groups.get(r.group, 0.0) + r.params
    params = float(sum(math.floor(v + 1e-9) for v in groups.values()))
  else:
    params = float(sum(r.params for r in counted))
  mults = float(sum(r.mults for r in counted))
  adds = float(sum(r.adds for r in counted))
  return {'params': params, 'mults': mults, 'adds': adds, 'flops': mults + adds}


def _layer_stats(
  layer: Layer, dead_out: np.ndarray, dead_in: np.ndarray | None
) -> tuple[np.ndarray, int, int, int, int]:
  """The kernel restricted to live (out, in) pairs: ``(mask of kept columns, N, nnz, c_in, c_out)``.

  ``dead_in`` is per input channel of the layer (None: none dead).
  """
  c_out_total, i_per_group = layer.shape_oi[:2]
  k_elems = math.prod(layer.shape_oi[2:])
  keep_out = ~dead_out
  if dead_in is None:
    keep_cols = np.ones((c_out_total, i_per_group), bool)
    dead_in_count = 0
  else:
    keep_cols = ~dead_in[_input_channel_index(layer)]
    dead_in_count = int(dead_in.sum())
  keep = keep_cols & keep_out[:, None]
  c_out = int(keep_out.sum())
  if layer.kind == 'depthwise':
    N = c_out * k_elems
    c_in = c_out
  else:
    c_in = i_per_group * layer.groups - dead_in_count
    N = int(keep.sum()) * k_elems if dead_in is not None else c_out * i_per_group * k_elems
  if layer.kernel is None:
    nnz = N
  else:
    nz = layer.kernel != 0
    nnz = int(np.sum(nz & keep.reshape(keep.shape + (1,) * (nz.ndim - 2))))
  return keep, N, nnz, c_in, c_out


def _bias_rows(
  layer: Layer, c_out: int, n_out: float, b: int, mul_bits: int, add_bits: int, group: str
) -> list[Row]:
  rows = []
  if any(p in ('add', 'sub') for p in layer.folded):
    rows.append(
      Row(
        f'{_module(layer)} (bias)',
        'bias',
        shape=(c_out,),
        params=c_out * b / 32,
        adds=n_out * add_bits / 32,
        c_out=c_out,
        group=group,
      )
    )
  return rows


def _module(layer: Layer) -> str:
  return layer.name.rsplit('/', 1)[0] if '/' in layer.name else layer.name


def _corrected(
  graph: Graph, ternary: dict[int, bool], *, b: int, mul_bits: int, add_bits: int, tree: bool
) -> list[Row]:
  rows: list[Row] = []
  first_conv = next((i.index for i in graph.layers if i.kind != 'dense'), None)
  for layer in graph.layers:
    group = (
      'fc'
      if layer.kind == 'dense'
      else 'stem'
      if layer.index == first_conv
      else 'projection'
      if layer.projection
      else 'body'
    )
    live = _live_kernel(layer)
    if live is None:
      dead_out = np.zeros(layer.c_out, bool)
    else:
      dead_out = ~np.any(live != 0, axis=tuple(range(1, live.ndim)))
    keep, N, nnz, c_in, c_out = _layer_stats(layer, dead_out, layer.zero_in)
    positions = layer.positions
    n_out = positions * c_out
    is_t = ternary[layer.index]
    scale = is_t and any(p in ('mul', 'div') for p in layer.folded)
    formats = _formats(N, nnz, c_out, b, is_t, 2 * c_out if scale else 2)
    storage = min(formats, key=formats.get)
    if layer.kernel is None:
      per_filter = np.full(c_out, math.prod(layer.shape_oi[1:]), float)
      mults = float(per_filter.sum()) * positions
      adds = float(np.sum(per_filter - 1)) * positions * add_bits / 32
    else:
      kept = np.where(keep.reshape(keep.shape + (1,) * (layer.kernel.ndim - 2)), layer.kernel, 0.0)
      axes = tuple(range(1, kept.ndim))
      n_pos = np.sum(kept > 0, axis=axes)[~dead_out]
      n_neg = np.sum(kept < 0, axis=axes)[~dead_out]
      if is_t:
        mults = float(np.sum((n_pos > 0).astype(int) + (n_neg > 0))) * positions
        if tree:
          bits = sum(
            _tree_bits(p, b, 1) + _tree_bits(q, b, 1) + (add_bits if p and q else 0)
            for p, q in zip(n_pos.tolist(), n_neg.tolist(), strict=True)
          )
          adds = bits * positions / 32
        else:
          adds = float(np.sum(np.maximum(n_pos + n_neg - 1, 0))) * positions * add_bits / 32
      else:
        nz = n_pos + n_neg
        mults = float(nz.sum()) * positions
        adds = float(np.sum(np.maximum(nz - 1, 0))) * positions * add_bits / 32
    rows.append(
      Row(
        layer.name,
        layer.kind,
        shape=layer.kernel_shape,
        N=N,
        nnz=nnz,
        sparsity=1 - nnz / N if N else 0.0,
        ternary=is_t,
        params=formats[storage],
        mults=mults * mul_bits / 32,
        adds=adds,
        dead_out=int(dead_out.sum()),
        dead_in=layer.shape_oi[1] * layer.groups - c_in if layer.kind != 'depthwise' else 0,
        c_in=c_in,
        c_out=c_out,
        positions=positions,
        storage=storage,
        group=group,
      )
    )
    rows.extend(_bias_rows(layer, c_out, n_out, b, mul_bits, add_bits, group))
  for op in graph.ops:
    src = graph.layers[op.src].name if op.src is not None else 'input'
    rows.append(
      Row(
        f'{op.primitive} after {_module_name(src)}',
        op.kind,
        shape=(op.size,),
        params=op.params * b / 32,
        mults=op.mults * mul_bits / 32,
        adds=op.adds * add_bits / 32,
        positions=op.size,
        counted=op.kind != 'uncounted',
      )
    )
  return rows


def _module_name(name: str) -> str:
  return name.rsplit('/', 1)[0] if '/' in name else name


def _reference(
  graph: Graph, ternary: dict[int, bool], *, b: int, mul_bits: int, add_bits: int, tree: bool
) -> list[Row]:
  rows: list[Row] = []
  convs = [layer for layer in graph.layers if layer.kind != 'dense']
  stem = convs[0] if convs else None
  body = [c for c in convs[1:] if not c.projection]
  pyramidal = any(c.after_affine for c in body)
  prev_dead: np.ndarray | None = None
  for position, layer in [(0, stem)] + list(enumerate(body)) if stem else []:
    is_stem = layer is stem
    group = 'stem' if is_stem else 'body'
    k = layer.kernel
    axes = tuple(range(1, len(layer.shape_oi)))
    dead_out = (
      np.zeros(layer.c_out, bool) if k is None else np.sum(k, axis=axes, dtype=np.float64) == 0
    )
    dead_in_idx = None if is_stem or layer.kind == 'depthwise' else prev_dead
    dead_in = None
    if dead_in_idx is not None and dead_in_idx.any():
      c_in_total = layer.shape_oi[1] * layer.groups
      dead_in = np.zeros(c_in_total, bool)
      idx = np.flatnonzero(dead_in_idx)
      dead_in[idx[idx < c_in_total]] = True
      extra = int(np.sum(idx >= c_in_total))  # The original subtracts them anyway.
    else:
      extra = 0
    prev_dead = None if is_stem else dead_out
    keep, N, nnz, c_in, c_out = _layer_stats(layer, dead_out, dead_in)
    c_in -= extra
    k_elems = math.prod(layer.shape_oi[2:])
    if layer.kind != 'depthwise' and (dead_in is not None or extra):
      N = c_in * c_out * k_elems
    density = nnz / N if N else 0.0
    is_t = ternary[layer.index]
    formats = _formats(N, nnz, c_out, b, is_t, 2)
    storage = min(formats, key=formats.get)
    vl = k_elems * density if layer.kind == 'depthwise' else k_elems * c_in * density
    side = math.ceil(
      math.ceil(layer.in_side / layer.stride) + 2 * layer.pad - layer.shape_oi[2] + 1
    )
    n_out = side * side * c_out
    mults = 2 * n_out if is_t else vl * n_out
    if is_t and tree:
      adds = _tree_bits(vl - 1, b, 1) * side * side * c_out / 32
    else:
      adds = (vl - 1) * n_out * add_bits / 32
    rows.append(
      Row(
        layer.name,
        layer.kind,
        shape=layer.kernel_shape,
        N=N,
        nnz=nnz,
        sparsity=1 - density,
        ternary=is_t,
        params=formats[storage],
        mults=mults * mul_bits / 32,
        adds=adds,
        dead_out=int(dead_out.sum()),
        dead_in=(int(dead_in.sum()) + extra) if dead_in is not None else extra,
        c_in=c_in,
        c_out=c_out,
        positions=side * side,
        storage=storage,
        group=group,
      )
    )
    odd = pyramidal and not is_stem and position % 2 == 1
    if layer.folded or pyramidal:
      bias_params = (c_in + c_out) if odd else c_out
      rows.append(
        Row(
          f'{_module(layer)} (bias)',
          'bias',
          shape=(bias_params,),
          params=bias_params * b / 32,
          adds=(2 if odd else 1) * n_out * add_bits / 32,
          group=group,
        )
      )
    if (pyramidal and not odd) or (not pyramidal and layer.activation is not None):
      rows.append(
        Row(
          f'relu after {_module(layer)}',
          'activation',
          shape=(n_out,),
          mults=n_out * mul_bits / 32,
          group=group,
        )
      )
  for layer in graph.layers:
    if layer.kind == 'dense':
      rows.extend(
        _reference_fc(layer, ternary[layer.index], b=b, mul_bits=mul_bits, add_bits=add_bits)
      )
    elif layer.projection and layer is not stem:
      rows.append(
        Row(layer.name, layer.kind, shape=layer.kernel_shape, group='projection', counted=False)
      )
  residuals = [op for op in graph.ops if op.kind == 'residual']
  if residuals:  # The published counter keeps only the last block's skip addition.
    last = residuals[-1]
    rows.append(
      Row(
        'skip addition (last block only)',
        'residual',
        shape=(last.size,),
        adds=last.size * add_bits / 32,
        group='body',
      )
    )
  return rows


def _reference_fc(layer: Layer, is_t: bool, *, b: int, mul_bits: int, add_bits: int) -> list[Row]:
  c_out, c_in = layer.shape_oi[:2]
  N = c_out * c_in
  nnz = N if layer.kernel is None else int(np.count_nonzero(layer.kernel))
  density = nnz / N
  if is_t:  # The published counter stores a ternary classifier as two masks, always.
    params, storage = 2 * N / 32 + 2 * b / 32, 'two-masks'
  else:
    params = nnz * b / 32 + (N / 32 if nnz < N else 0.0)
    storage = 'sparse-fp' if nnz < N else 'dense-fp'
  n = layer.positions
  rows = [
    Row(
      layer.name,
      'dense',
      shape=layer.kernel_shape,
      N=N,
      nnz=nnz,
      sparsity=1 - density,
      ternary=is_t,
      params=params,
      mults=c_in * density * c_out * n * mul_bits / 32,
      adds=(c_in * density - 1) * c_out * n * add_bits / 32,
      c_in=c_in,
      c_out=c_out,
      positions=n,
      storage=storage,
      group='fc',
    )
  ]
  if any(p in ('add', 'sub') for p in layer.folded):
    rows.append(
      Row(
        f'{_module(layer)} (bias)',
        'bias',
        shape=(c_out,),
        params=c_out * b / 32,
        adds=c_out * n * add_bits / 32,
        group='fc',
      )
    )
  return rows
