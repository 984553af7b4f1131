"""MicroNet: the compound-scaled CIFAR super-network of EC2T.

Marban, Becking, Wiedemann & Samek, "Learning Sparse & Ternary Neural Networks
with Entropy-Constrained Trained Ternarization (EC2T)", CVPR-W 2020
(arXiv 2004.01077), §3.4 and docs/algorithm.md §8: a ResNet-44-like CIFAR net with pyramidal
blocks (Han et al., "Deep Pyramidal Residual Networks", CVPR 2017), scaled in
depth and width with the EfficientNet rules (Tan & Le, ICML 2019).

Architecture choices, pinned by the published parameter count (d=1.4, w=1.2,
φ=3.5: 8,055,124 parameters for 100 classes, 8,044,234 for 10):

* the stem has ``round_filters(16)`` channels (32 at φ=3.5), so stage 1 starts
  shape-preserving and its blocks all have identity shortcuts;
* stride 2 sits on ``conv1`` of the first block of stages 2 and 3;
* a block has a ``shortcut_conv`` (1x1, no bias) + ``shortcut_bn`` exactly when
  the stride or the channel count changes (only the first block of stages 2
  and 3);
* no convolution has a bias, and there is no BatchNorm in the head (the head
  is ReLU → pool → ``linear``).

With these choices the count is exact: stem 864 + 64, stage 1 23·18,624,
stage 2 57,792 + 22·74,112, stage 3 207,248 + 22·259,920, head 120·C + C.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ec2t_jax.models import layers

__all__ = ['MicroNet', 'MicroNetBlock', 'micronet_scaled']

# Kaiming-normal (fan_in, gain sqrt(2)), untruncated like torch.nn.init.kaiming_normal_.
kaiming_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')

_PAD1 = ((1, 1), (1, 1))
BASE_WIDTHS = (16, 32, 64)
BASE_BLOCKS = 7


class MicroNetBlock(nn.Module):
  """Pyramidal residual block.

  ``x → bn1 → conv1 (3x3, stride) → bn2 → ReLU → Dropout → conv2 (3x3) → bn3``,
  plus ``x`` (identity) or ``shortcut_bn(shortcut_conv(x))`` (1x1, stride) when
  the shape changes. No ReLU after the addition.

  Attributes:
    planes: output channels.
    conv: the MicroNet's bias-free He-normal convolution, for the 3x3 and 1x1 layers.
    norm: the MicroNet's BatchNorm, in train or eval mode.
    strides: stride of ``conv1`` and of the projection shortcut.
    dropout_rate: dropout between the two convolutions (rng ``'dropout'``).
  """

  planes: int
  conv: layers.ModuleDef
  norm: layers.ModuleDef
  strides: int = 1
  dropout_rate: float = 0.2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Applies the block to NHWC features.

    Args:
      x: features, shape ``(N, H, W, C)``.
      train: apply dropout if True (BatchNorm's mode is set by ``norm``).

    Returns:
      Features, shape ``(N, H/strides, W/strides, planes)``.
    """
    y = self.norm(name='bn1')(x)
    y = self.conv(self.planes, (3, 3), strides=self.strides, padding=_PAD1, name='conv1')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = self.conv(self.planes, (3, 3), padding=_PAD1, name='conv2')(y)
    y = self.norm(name='bn3')(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.planes:
      shortcut = self.conv(
        self.planes, (1, 1), strides=self.strides, padding='VALID', name='shortcut_conv'
      )(x)
      shortcut = self.norm(name='shortcut_bn')(shortcut)
    return y + shortcut.astype(y.dtype)


class MicroNet(nn.Module):
  """The EC2T CIFAR MicroNet, scaled by ``depth_mult`` and ``width_mult``.

  Stem ``conv1`` (3x3, ``round_filters(16)``, no bias) ``bn1`` ReLU; stages
  ``i = 1..3`` of ``ceil(7·depth_mult)`` blocks ``layer{i}_{j}`` with
  ``round_filters(16/32/64)`` channels (stride 2 at the first block of stages
  2 and 3); head ReLU → global average pool → ``linear``. At
  ``depth_mult = width_mult = 1`` this is a 44-layer pyramidal ResNet.

  Attributes:
    num_classes: number of output logits.
    depth_mult: depth multiplier (``d**phi``).
    width_mult: width multiplier (``w**phi``).
    dropout_rate: dropout inside each block (rng ``'dropout'``).
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay ``param_dtype``.
    param_dtype: parameter dtype.
    bn_momentum: BatchNorm running-average momentum (flax convention; PyTorch 0.1).
    bn_epsilon: BatchNorm epsilon.
    axis_name: mapped axis over which BatchNorm averages batch statistics.
  """

  num_classes: int = 10
  depth_mult: float = 1.0
  width_mult: float = 1.0
  dropout_rate: float = 0.2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: str | None = None

  @property
  def widths(self) -> tuple[int, int, int]:
    """Channels of the three stages after width scaling."""
    return tuple(layers.round_filters(f, self.width_mult) for f in BASE_WIDTHS)

  @property
  def blocks_per_stage(self) -> int:
    """Blocks per stage after depth scaling: ``ceil(7·depth_mult)``."""
    return layers.round_repeats(BASE_BLOCKS, self.depth_mult)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits for a batch of NHWC images.

    Args:
      x: images, shape ``(N, 32, 32, 3)``.
      train: batch statistics, ``batch_stats`` updates and dropout if True.

    Returns:
      Logits, shape ``(N, num_classes)``, dtype ``dtype``.
    """
    conv = layers.with_dtypes(self, layers.Conv, use_bias=False, kernel_init=kaiming_normal)
    norm = layers.batch_norm(self, train)
    widths = self.widths
    x = conv(widths[0], (3, 3), padding=_PAD1, name='conv1')(x)
    x = nn.relu(norm(name='bn1')(x))
    block = functools.partial(MicroNetBlock, conv=conv, norm=norm, dropout_rate=self.dropout_rate)
    for i, planes in enumerate(widths, start=1):
      for j in range(self.blocks_per_stage):
        strides = 2 if (i > 1 and j == 0) else 1
        x = block(planes, strides=strides, name=f'layer{i}_{j}')(x, train=train)
    x = jnp.mean(nn.relu(x), axis=(1, 2))
    dense = layers.with_dtypes(self, nn.Dense, kernel_init=kaiming_normal)
    return dense(self.num_classes, name='linear')(x)


def micronet_scaled(
  d: float,
  w: float,
  phi: float,
  num_classes: int,
  **kwargs: Any,
) -> MicroNet:
  """Builds a compound-scaled MicroNet: ``depth_mult = d**phi``, ``width_mult = w**phi``.

  The published EC2T super-net is ``micronet_scaled(1.4, 1.2, 3.5, C)``: 23 blocks
  per stage, widths 32/64/120, 8,055,124 parameters for C=100.

  Args:
    d: depth base coefficient (searched at φ=1 under ``d·w² ≈ 2``).
    w: width base coefficient.
    phi: compound coefficient.
    num_classes: number of output logits.
    **kwargs: further ``MicroNet`` attributes (``dtype``, ``dropout_rate``, ...).

  Returns:
    The (unbound) ``MicroNet`` module.

  Raises:
    ValueError: if ``d`` or ``w`` is not positive.

  Example:
    >>> model = micronet_scaled(1.4, 1.2, 3.5, num_classes=100)
    >>> model.blocks_per_stage, model.widths
    (23, (32, 64, 120))
  """
  if d <= 0 or w <= 0:
    raise ValueError(f'd and w must be > 0, got d={d}, w={w}')
  return MicroNet(num_classes=num_classes, depth_mult=d**phi, width_mult=w**phi, **kwargs)
