"""CIFAR ResNets (ResNet-20/32/44/56/110) with parameter-free option-A shortcuts.

He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR 2016
(arXiv 1512.03385), §4.2: three stages of ``n`` basic blocks with 16/32/64
channels, depth ``6n + 2``.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ec2t_jax.models import layers

__all__ = ['CifarBasicBlock', 'CifarResNet']

# Kaiming-normal (fan_in, gain sqrt(2)), untruncated like torch.nn.init.kaiming_normal_.
kaiming_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')

_PAD1 = ((1, 1), (1, 1))


class CifarBasicBlock(nn.Module):
  """Basic residual block: ``conv1`` ``bn1`` ReLU ``conv2`` ``bn2`` + shortcut, ReLU.

  When the block changes shape (stride 2 or more channels) the shortcut is
  "option A" of He et al. 2016: subsample ``x[:, ::2, ::2, :]`` and zero-pad
  the channels by ``planes // 4`` on each side, no parameters.

  Attributes:
    planes: output channels.
    conv: the network's 3x3 convolution (padding 1, no bias); the block sets the stride.
    norm: the network's BatchNorm, in train or eval mode.
    strides: stride of ``conv1`` (1 or 2).
  """

  planes: int
  conv: layers.ModuleDef
  norm: layers.ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the block to NHWC features.

    Args:
      x: features, shape ``(N, H, W, C)``.

    Returns:
      Features, shape ``(N, H/strides, W/strides, planes)``.
    """
    y = self.conv(self.planes, strides=self.strides, name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.planes, name='conv2')(y)
    y = self.norm(name='bn2')(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.planes:
      shortcut = x[:, :: self.strides, :: self.strides, :]
      pad = self.planes // 4
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (pad, pad)))
    return nn.relu(y + shortcut.astype(y.dtype))


class CifarResNet(nn.Module):
  """ResNet-``depth`` for 32x32 images, ``depth = 6n + 2``.

  ``conv1`` (3x3, 16, no bias) ``bn1`` ReLU; stages ``i = 1..3`` of ``n``
  blocks ``layer{i}_{j}`` with 16/32/64 channels (stride 2 at the first block
  of stages 2 and 3); global average pool; ``linear``. ResNet-20 has 269,722
  parameters for 10 classes.

  Attributes:
    depth: 20, 32, 44, 56, 110, ... (any ``6n + 2``).
    num_classes: number of output logits.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay ``param_dtype``.
    param_dtype: parameter dtype.
    bn_momentum: BatchNorm running-average momentum (flax convention; PyTorch 0.1).
    bn_epsilon: BatchNorm epsilon.
    axis_name: mapped axis over which BatchNorm averages batch statistics.
  """

  depth: int = 20
  num_classes: int = 10
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits for a batch of NHWC images.

    Args:
      x: images, shape ``(N, 32, 32, 3)``.
      train: use batch statistics and update ``batch_stats`` if True.

    Returns:
      Logits, shape ``(N, num_classes)``, dtype ``dtype``.

    Raises:
      ValueError: if ``depth`` is not of the form ``6n + 2``.
    """
    if self.depth < 8 or (self.depth - 2) % 6:
      raise ValueError(f'depth must be 6n + 2 with n >= 1, got {self.depth}')
    blocks_per_stage = (self.depth - 2) // 6
    conv = layers.with_dtypes(
      self,
      layers.Conv,
      kernel_size=(3, 3),
      padding=_PAD1,
      use_bias=False,
      kernel_init=kaiming_normal,
    )
    norm = layers.batch_norm(self, train)
    x = conv(16, name='conv1')(x)
    x = nn.relu(norm(name='bn1')(x))
    for i, planes in enumerate((16, 32, 64), start=1):
      for j in range(blocks_per_stage):
        strides = 2 if (i > 1 and j == 0) else 1
        block = CifarBasicBlock(planes, conv=conv, norm=norm, strides=strides, name=f'layer{i}_{j}')
        x = block(x)
    x = jnp.mean(x, axis=(1, 2))
    dense = layers.with_dtypes(self, nn.Dense, kernel_init=kaiming_normal)
    return dense(self.num_classes, name='linear')(x)
