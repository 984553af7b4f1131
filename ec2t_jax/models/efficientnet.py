"""EfficientNet-B0 … B7 in the layout of the ``efficientnet_pytorch`` port.

Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML 2019 (arXiv 1905.11946). MBConv blocks (Sandler et al.,
MobileNetV2, CVPR 2018) with squeeze-and-excitation (Hu et al., CVPR 2018),
swish, and stochastic depth (Huang et al., ECCV 2016). Submodule names follow
``efficientnet_pytorch`` without its leading underscores (``conv_stem``,
``blocks_{k}``, ``se_reduce``, ...), so its pretrained weights convert by name.
Parameter counts for 1000 classes equal that port's: B0 5,288,548, B1 7,794,184.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ec2t_jax.models import layers

__all__ = [
  'BLOCK_ARGS',
  'EfficientNet',
  'MBConvBlock',
  'VARIANTS',
  'BlockArgs',
  'Variant',
  'from_variant',
  'tf_same_padding',
]

# Kernel init of the TF reference: N(0, 2/fan_out) for convs, where a depthwise
# kernel's fan_out is k·k (flax's fan_in of the (k, k, 1, C) kernel).
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
depthwise_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_out', 'uniform')


@dataclasses.dataclass(frozen=True)
class BlockArgs:
  """One stage of the B0 baseline (before width and depth scaling).

  Attributes:
    repeats: number of blocks in the stage.
    kernel: depthwise kernel size.
    strides: stride of the first block (the others use 1).
    expand_ratio: channel expansion of the inverted bottleneck.
    input_filters: channels into the stage.
    output_filters: channels out of the stage.
    se_ratio: squeeze channels as a fraction of the block *input* channels.
  """

  repeats: int
  kernel: int
  strides: int
  expand_ratio: int
  input_filters: int
  output_filters: int
  se_ratio: float = 0.25


BLOCK_ARGS = (
  BlockArgs(1, 3, 1, 1, 32, 16),
  BlockArgs(2, 3, 2, 6, 16, 24),
  BlockArgs(2, 5, 2, 6, 24, 40),
  BlockArgs(3, 3, 2, 6, 40, 80),
  BlockArgs(3, 5, 1, 6, 80, 112),
  BlockArgs(4, 5, 2, 6, 112, 192),
  BlockArgs(1, 3, 1, 6, 192, 320),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280


@dataclasses.dataclass(frozen=True)
class Variant:
  """Compound-scaling coefficients of one EfficientNet variant.

  Attributes:
    width: width multiplier.
    depth: depth multiplier.
    resolution: input height and width.
    dropout: dropout rate before the classifier.
  """

  width: float
  depth: float
  resolution: int
  dropout: float


VARIANTS = {
  'b0': Variant(1.0, 1.0, 224, 0.2),
  'b1': Variant(1.0, 1.1, 240, 0.2),
  'b2': Variant(1.1, 1.2, 260, 0.3),
  'b3': Variant(1.2, 1.4, 300, 0.3),
  'b4': Variant(1.4, 1.8, 380, 0.4),
  'b5': Variant(1.6, 2.2, 456, 0.4),
  'b6': Variant(1.8, 2.6, 528, 0.5),
  'b7': Variant(2.0, 3.1, 600, 0.5),
}


def tf_same_padding(size: int, kernel: int, strides: int) -> tuple[int, int]:
  """TensorFlow "SAME" padding of one spatial axis: ``(before, after)``.

  ``total = max((ceil(size/strides) − 1)·strides + kernel − size, 0)``, with
  the odd pixel after (bottom/right), as in TF and efficientnet_pytorch's
  ``Conv2dStaticSamePadding``.

  Args:
    size: input size along the axis.
    kernel: kernel size.
    strides: stride.

  Returns:
    Padding before and after.

  Example:
    >>> tf_same_padding(224, 3, 2)
    (0, 1)
  """
  total = max((math.ceil(size / strides) - 1) * strides + kernel - size, 0)
  return total // 2, total - total // 2


class MBConvBlock(nn.Module):
  """Mobile inverted bottleneck with squeeze-and-excitation.

  ``expand_conv`` (1x1, if ``expand_ratio != 1``) ``bn0`` swish →
  ``depthwise_conv`` (k x k, stride) ``bn1`` swish → SE (global pool,
  ``se_reduce`` swish ``se_expand`` sigmoid, multiply) → ``project_conv`` (1x1)
  ``bn2``; identity skip with stochastic depth when stride is 1 and the
  channel count is unchanged.

  Attributes:
    input_filters: channels in.
    output_filters: channels out.
    kernel: depthwise kernel size.
    strides: depthwise stride.
    expand_ratio: expansion of the inverted bottleneck.
    conv: the EfficientNet's bias-free convolution with ``conv_init``; the block
      adds groups and ``depthwise_init`` for the depthwise one, a bias for SE.
    norm: the EfficientNet's BatchNorm, in train or eval mode.
    se_ratio: squeeze channels = ``max(1, int(input_filters·se_ratio))``.
    drop_connect_rate: stochastic-depth drop probability of this block.
    same_padding: TF "SAME" padding from the input size if True, else ``k//2``.
  """

  input_filters: int
  output_filters: int
  kernel: int
  strides: int
  expand_ratio: int
  conv: layers.ModuleDef
  norm: layers.ModuleDef
  se_ratio: float = 0.25
  drop_connect_rate: float = 0.0
  same_padding: bool = True

  def _conv1x1(self, features: int, name: str, use_bias: bool = False) -> nn.Module:
    return self.conv(features, (1, 1), padding='VALID', use_bias=use_bias, name=name)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Applies the block to NHWC features.

    Args:
      x: features, shape ``(N, H, W, input_filters)``.
      train: apply stochastic depth if True (BatchNorm's mode is set by ``norm``).

    Returns:
      Features, shape ``(N, ceil(H/strides), ceil(W/strides), output_filters)``.
    """
    inputs = x
    channels = self.input_filters * self.expand_ratio
    if self.expand_ratio != 1:
      x = self._conv1x1(channels, 'expand_conv')(x)
      x = nn.swish(self.norm(name='bn0')(x))
    k, s = self.kernel, self.strides
    if self.same_padding:
      padding = [tf_same_padding(x.shape[1], k, s), tf_same_padding(x.shape[2], k, s)]
    else:
      padding = [(k // 2, k // 2), (k // 2, k // 2)]
    x = self.conv(
      channels,
      (k, k),
      strides=s,
      padding=padding,
      feature_group_count=channels,
      kernel_init=depthwise_init,
      name='depthwise_conv',
    )(x)
    x = nn.swish(self.norm(name='bn1')(x))
    if self.se_ratio and 0 < self.se_ratio <= 1:
      squeezed = max(1, int(self.input_filters * self.se_ratio))
      se = jnp.mean(x, axis=(1, 2), keepdims=True)
      se = nn.swish(self._conv1x1(squeezed, 'se_reduce', use_bias=True)(se))
      se = self._conv1x1(channels, 'se_expand', use_bias=True)(se)
      x = x * nn.sigmoid(se)
    x = self._conv1x1(self.output_filters, 'project_conv')(x)
    x = self.norm(name='bn2')(x)
    if s == 1 and self.input_filters == self.output_filters:
      if train and self.drop_connect_rate > 0:
        x = _drop_connect(x, self.drop_connect_rate, self.make_rng('dropout'))
      x = x + inputs.astype(x.dtype)
    return x


def _drop_connect(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Stochastic depth: drops the whole residual branch per example, rescales the rest."""
  keep_prob = 1.0 - rate
  keep = jax.random.bernoulli(rng, keep_prob, (x.shape[0], 1, 1, 1))
  return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))


class EfficientNet(nn.Module):
  """EfficientNet scaled by ``width`` and ``depth`` coefficients.

  ``conv_stem`` (3x3/2, ``round_filters(32)``, no bias) ``bn0`` swish; blocks
  ``blocks_{k}`` (``k`` a global index) from the B0 stages, each stage with
  ``round_filters`` channels and ``ceil(depth·repeats)`` blocks, block ``k``
  with drop-connect rate ``drop_connect_rate·k/num_blocks``; ``conv_head``
  (1x1, ``round_filters(1280)``) ``bn1`` swish; global average pool; dropout;
  ``fc``.

  Attributes:
    width: width coefficient.
    depth: depth coefficient.
    dropout_rate: dropout before ``fc`` (rng ``'dropout'``).
    num_classes: number of output logits.
    drop_connect_rate: stochastic-depth rate of the last block (rng ``'dropout'``).
    same_padding: TF "SAME" padding from the input size (as the pretrained
      weights expect) if True, else symmetric ``k//2`` padding.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay ``param_dtype``.
    param_dtype: parameter dtype.
    bn_momentum: BatchNorm running-average momentum (flax convention; TF 0.99).
    bn_epsilon: BatchNorm epsilon.
    axis_name: mapped axis over which BatchNorm averages batch statistics.
  """

  width: float = 1.0
  depth: float = 1.0
  dropout_rate: float = 0.2
  num_classes: int = 1000
  drop_connect_rate: float = 0.2
  same_padding: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  axis_name: str | None = None

  def _block_configs(self) -> list[dict[str, Any]]:
    configs = []
    for stage in BLOCK_ARGS:
      in_f = layers.round_filters(stage.input_filters, self.width)
      out_f = layers.round_filters(stage.output_filters, self.width)
      for r in range(layers.round_repeats(stage.repeats, self.depth)):
        configs.append(
          dict(
            input_filters=in_f if r == 0 else out_f,
            output_filters=out_f,
            kernel=stage.kernel,
            strides=stage.strides if r == 0 else 1,
            expand_ratio=stage.expand_ratio,
            se_ratio=stage.se_ratio,
          )
        )
    return configs

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits for a batch of NHWC images.

    Args:
      x: images, shape ``(N, R, R, 3)`` (``R`` the variant's resolution).
      train: batch statistics, ``batch_stats`` updates, dropout and stochastic depth.

    Returns:
      Logits, shape ``(N, num_classes)``, dtype ``dtype``.
    """
    conv = layers.with_dtypes(self, layers.Conv, use_bias=False, kernel_init=conv_init)
    norm = layers.batch_norm(self, train)
    if self.same_padding:
      stem_pad = [tf_same_padding(x.shape[1], 3, 2), tf_same_padding(x.shape[2], 3, 2)]
    else:
      stem_pad = [(1, 1), (1, 1)]
    stem = layers.round_filters(STEM_FILTERS, self.width)
    x = conv(stem, (3, 3), strides=2, padding=stem_pad, name='conv_stem')(x)
    x = nn.swish(norm(name='bn0')(x))
    configs = self._block_configs()
    for k, cfg in enumerate(configs):
      x = MBConvBlock(
        **cfg,
        conv=conv,
        norm=norm,
        drop_connect_rate=self.drop_connect_rate * k / len(configs),
        same_padding=self.same_padding,
        name=f'blocks_{k}',
      )(x, train=train)
    head = layers.round_filters(HEAD_FILTERS, self.width)
    x = conv(head, (1, 1), padding='VALID', name='conv_head')(x)
    x = nn.swish(norm(name='bn1')(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    dense = layers.with_dtypes(self, nn.Dense, kernel_init=dense_init)
    return dense(self.num_classes, name='fc')(x)


def from_variant(variant: str, num_classes: int, **kwargs: Any) -> EfficientNet:
  """Builds EfficientNet-``variant`` with its published coefficients.

  Args:
    variant: ``'b0'`` … ``'b7'``.
    num_classes: number of output logits.
    **kwargs: further ``EfficientNet`` attributes; ``dropout_rate`` overrides
      the variant's default.

  Returns:
    The (unbound) ``EfficientNet`` module.

  Raises:
    ValueError: if ``variant`` is unknown.

  Example:
    >>> model = from_variant('b1', num_classes=1000)
    >>> model.depth, VARIANTS['b1'].resolution
    (1.1, 240)
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got '{variant}'")
  v = VARIANTS[variant]
  kwargs.setdefault('dropout_rate', v.dropout)
  return EfficientNet(width=v.width, depth=v.depth, num_classes=num_classes, **kwargs)
