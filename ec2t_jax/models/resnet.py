"""ImageNet ResNets (ResNet-18/34/50) with the torchvision architecture.

He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR 2016
(arXiv 1512.03385). Layer for layer the torchvision model: projection shortcuts
(``downsample``) only where the shape changes, and in the bottleneck the stride
sits on the 3x3 convolution ("ResNet v1.5"). Parameter counts for 1000 classes
equal torchvision's: 11,689,512 / 21,797,672 / 25,557,032.
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ec2t_jax.models import layers

__all__ = ['BasicBlock', 'Bottleneck', 'ResNet', 'STAGE_SIZES']

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu') for convs, and
# PyTorch's default Linear init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the classifier.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')

STAGE_SIZES = {
  18: ('basic', (2, 2, 2, 2)),
  34: ('basic', (3, 4, 6, 3)),
  50: ('bottleneck', (3, 4, 6, 3)),
}


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
  return ((k // 2, k // 2), (k // 2, k // 2))


class _Block(nn.Module):
  """Fields and the projection shortcut shared by the two block types."""

  planes: int
  conv: layers.ModuleDef
  norm: layers.ModuleDef
  strides: int = 1

  def _conv(self, features: int, kernel: int, strides: int, name: str) -> nn.Module:
    return self.conv(features, (kernel, kernel), strides=strides, padding=_pad(kernel), name=name)

  def _shortcut(self, x: jax.Array, out_features: int) -> jax.Array:
    if self.strides != 1 or x.shape[-1] != out_features:
      x = self._conv(out_features, 1, self.strides, 'downsample_conv')(x)
      x = self.norm(name='downsample_bn')(x)
    return x


class BasicBlock(_Block):
  """torchvision ``BasicBlock``: ``conv1`` (3x3, stride) ``bn1`` ReLU ``conv2`` ``bn2``.

  Plus the identity, or ``downsample_conv`` (1x1, stride) + ``downsample_bn``
  when the shape changes; ReLU after the addition. Output has ``planes`` channels.

  Attributes:
    planes: output channels.
    conv: the ResNet's bias-free convolution; the block sets kernel size, stride, padding.
    norm: the ResNet's BatchNorm, in train or eval mode.
    strides: stride of ``conv1`` and of the projection shortcut.
  """

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the block to NHWC features.

    Args:
      x: features, shape ``(N, H, W, C)``.

    Returns:
      Features, shape ``(N, H/strides, W/strides, planes)``.
    """
    y = self._conv(self.planes, 3, self.strides, 'conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self._conv(self.planes, 3, 1, 'conv2')(y)
    y = self.norm(name='bn2')(y)
    return nn.relu(y + self._shortcut(x, self.planes).astype(y.dtype))


class Bottleneck(_Block):
  """torchvision ``Bottleneck`` (v1.5): 1x1 → 3x3 (stride) → 1x1 (``4·planes``).

  ``conv1`` ``bn1`` ReLU ``conv2`` ``bn2`` ReLU ``conv3`` ``bn3``, plus the
  identity or ``downsample_conv`` + ``downsample_bn``; ReLU after the addition.

  Attributes:
    planes: bottleneck width; the output has ``4·planes`` channels.
    conv: as for `BasicBlock`.
    norm: as for `BasicBlock`.
    strides: stride of ``conv2`` and of the projection shortcut.
  """

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the block to NHWC features.

    Args:
      x: features, shape ``(N, H, W, C)``.

    Returns:
      Features, shape ``(N, H/strides, W/strides, 4·planes)``.
    """
    out_features = self.planes * self.expansion
    y = self._conv(self.planes, 1, 1, 'conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self._conv(self.planes, 3, self.strides, 'conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self._conv(out_features, 1, 1, 'conv3')(y)
    y = self.norm(name='bn3')(y)
    return nn.relu(y + self._shortcut(x, out_features).astype(y.dtype))


class ResNet(nn.Module):
  """torchvision ResNet for 224x224 ImageNet images.

  ``conv1`` (7x7/2, pad 3) ``bn1`` ReLU maxpool (3x3/2, pad 1); four stages
  of blocks ``layer{i}_{j}`` (``i = 1..4``, ``j`` from 0) with 64/128/256/512
  planes, stride 2 at the first block of stages 2–4; global average pool; ``fc``.

  Attributes:
    stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
    block: ``'basic'`` or ``'bottleneck'``.
    num_classes: number of output logits.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay ``param_dtype``.
    param_dtype: parameter dtype.
    bn_momentum: BatchNorm running-average momentum (flax convention; PyTorch 0.1).
    bn_epsilon: BatchNorm epsilon.
    axis_name: mapped axis over which BatchNorm averages batch statistics.
  """

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = 'basic'
  num_classes: int = 1000
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits for a batch of NHWC images.

    Args:
      x: images, shape ``(N, H, W, 3)`` (224x224 for ImageNet).
      train: use batch statistics and update ``batch_stats`` if True.

    Returns:
      Logits, shape ``(N, num_classes)``, dtype ``dtype``.

    Raises:
      ValueError: if ``block`` is not ``'basic'`` or ``'bottleneck'``.
    """
    blocks = {'basic': BasicBlock, 'bottleneck': Bottleneck}
    if self.block not in blocks:
      raise ValueError(f"block must be one of {sorted(blocks)}, got '{self.block}'")
    conv = layers.with_dtypes(self, layers.Conv, use_bias=False, kernel_init=conv_init)
    norm = layers.batch_norm(self, train)
    block = functools.partial(blocks[self.block], conv=conv, norm=norm)
    x = conv(64, (7, 7), strides=2, padding=_pad(7), name='conv1')(x)
    x = nn.relu(norm(name='bn1')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
    for i, num_blocks in enumerate(self.stage_sizes, start=1):
      planes = 64 * 2 ** (i - 1)
      for j in range(num_blocks):
        strides = 2 if (i > 1 and j == 0) else 1
        x = block(planes, strides=strides, name=f'layer{i}_{j}')(x)
    x = jnp.mean(x, axis=(1, 2))
    dense = layers.with_dtypes(self, nn.Dense, kernel_init=dense_init)
    return dense(self.num_classes, name='fc')(x)
