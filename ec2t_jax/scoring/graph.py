"""What `trace` finds in a forward pass: layers, other operations on activations, warnings.

A `Layer` is one convolution or dense layer whose kernel is a leaf of the
variables; an `Op` is any other operation on activations (residual additions,
activations, pooling, standalone BatchNorm, ...). The two counting rule sets
(`ec2t_jax.scoring.corrected`, `ec2t_jax.scoring.reference`) read only these.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ['Graph', 'Layer', 'Op', 'module_of']

LAYER_KINDS = ('conv', 'depthwise', 'dense')


def module_of(name: str) -> str:
  """``'layer1_0/conv1/kernel'`` -> ``'layer1_0/conv1'``: the module a leaf belongs to."""
  return name.rsplit('/', 1)[0] if '/' in name else name


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

  @property
  def module(self) -> str:
    """The module the kernel belongs to (``'layer1_0/conv1'``)."""
    return module_of(self.name)

  @property
  def has_bias(self) -> bool:
    """True if an addition of a parameter (a bias, a BatchNorm shift) is folded into the layer."""
    return any(p in ('add', 'sub') for p in self.folded)

  @property
  def has_scale(self) -> bool:
    """True if a multiplication by a parameter (a BatchNorm scale) is folded into the layer."""
    return any(p in ('mul', 'div') for p in self.folded)

  def input_channel_index(self) -> np.ndarray:
    """``(out, in per group)`` -> index of the input channel each kernel column reads."""
    c_out, i_per_group = self.shape_oi[:2]
    per_group = max(c_out // self.groups, 1)
    group = np.arange(c_out) // per_group
    return group[:, None] * i_per_group + np.arange(i_per_group)[None, :]

  def live_kernel(self) -> np.ndarray | None:
    """The kernel with the columns that read identically-zero inputs set to zero."""
    k = self.kernel
    if self.zero_in is None or k is None:
      return k
    dead = self.zero_in[self.input_channel_index()]
    return np.where(dead.reshape(dead.shape + (1,) * (k.ndim - 2)), 0.0, k)

  def zero_filters(self) -> np.ndarray | None:
    """Per output channel: True for an all-zero filter over the live inputs (None if abstract)."""
    live = self.live_kernel()
    if live is None:
      return None
    return ~np.any(live != 0, axis=tuple(range(1, live.ndim)))


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
