"""Building blocks shared by the model zoo.

`conv_general_dilated` is a drop-in replacement for `jax.lax.conv_general_dilated`
(flax's `nn.Conv` takes it as its `conv_general_dilated` attribute) whose
backward pass on CPU computes the kernel gradient over chunks of 16 images.

Why: XLA:CPU's kernel-gradient convolution (the inputs convolved with the
output gradients, contracting over batch and space) falls off a performance
cliff when the batch is large, far slower than the forward pass, while the same
work split into convolutions over a few images each stays fast (measurements in
docs/benchmarks.md). It dominated the train step of every CNN here. On GPU and
TPU the backward pass is the stock one (`jax.lax.platform_dependent`), so
results there do not change.

The forward pass and the input gradient are always the stock XLA convolutions.
Grouped or dilated convolutions fall back to `jax.lax.conv_general_dilated`.

The networks build their layers once per call as shared partials
(`with_dtypes`, `batch_norm`) and hand them to their blocks, which therefore
do not repeat the dtype and BatchNorm settings; `round_filters` and
`round_repeats` are the compound-scaling rules of MicroNet and EfficientNet.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _explicit_padding(
  padding: str | Sequence[tuple[int, int]],
  lhs_shape: Sequence[int],
  rhs_shape: Sequence[int],
  strides: Sequence[int],
) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(lhs_shape[1:-1], rhs_shape[:-2], strides, padding)
  else:
    pads = padding
  return tuple((int(lo), int(hi)) for lo, hi in pads)


def _conv(x, w, strides, padding, precision, preferred_element_type):
  return lax.conv_general_dilated(
    x,
    w,
    strides,
    padding,
    dimension_numbers=_NHWC,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )


# Images per kernel-gradient convolution on CPU (see `kernel_grad_in_chunks`).
CPU_KERNEL_GRAD_CHUNK = 16


def kernel_grad_in_chunks(
  x: jax.Array,
  w: jax.Array,
  dy: jax.Array,
  strides: Sequence[int],
  padding: Sequence[tuple[int, int]],
  precision: Any = None,
  chunk: int | None = None,
) -> jax.Array:
  """The kernel gradient of an NHWC/HWIO convolution, summed over chunks of the batch.

  Each chunk is XLA's own kernel-gradient convolution on `chunk` images; the
  chunks are unrolled (a `lax.scan` over them is several times slower on CPU).

  Args:
    x: the convolution's input, `(N, H, W, C_in)`.
    w: its kernel, `(KH, KW, C_in, C_out)` (only its shape and dtype are used).
    dy: the gradient of its output, `(N, H_out, W_out, C_out)`.
    strides: `(stride_h, stride_w)`.
    padding: explicit `((top, bottom), (left, right))` padding.
    precision: passed to the convolutions.
    chunk: images per convolution (default `CPU_KERNEL_GRAD_CHUNK`); the largest
      divisor of `N` not above it is used.

  Returns:
    `d loss / d kernel` in `w`'s dtype, accumulated in float32 across chunks.
  """
  n = x.shape[0]
  chunk = CPU_KERNEL_GRAD_CHUNK if chunk is None else chunk
  size = max(d for d in range(1, min(chunk, n) + 1) if n % d == 0)
  total = None
  for start in range(0, n, size):
    xi = lax.slice_in_dim(x, start, start + size)
    di = lax.slice_in_dim(dy, start, start + size)
    _, vjp = jax.vjp(lambda k, xi=xi: _conv(xi, k, strides, padding, precision, None), w)
    (part,) = vjp(di)
    part = part.astype(jnp.float32)
    total = part if total is None else total + part
  return total.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _fast_conv(x, w, strides, padding, precision, preferred_element_type):
  return _conv(x, w, strides, padding, precision, preferred_element_type)


def _fast_conv_fwd(x, w, strides, padding, precision, preferred_element_type):
  y = _conv(x, w, strides, padding, precision, preferred_element_type)
  return y, (x, w)


def _fast_conv_bwd(strides, padding, precision, preferred_element_type, residuals, dy):
  x, w = residuals

  def stock(x, w, dy):
    _, vjp = jax.vjp(lambda a, b: _conv(a, b, strides, padding, precision, None), x, w)
    return vjp(dy.astype(jnp.result_type(x, w)))

  def on_cpu(x, w, dy):
    _, vjp = jax.vjp(lambda a: _conv(a, w, strides, padding, precision, None), x)
    (dx,) = vjp(dy.astype(jnp.result_type(x, w)))
    dw = kernel_grad_in_chunks(x, w, dy.astype(dx.dtype), strides, padding, precision)
    return dx, dw

  dx, dw = lax.platform_dependent(x, w, dy, cpu=on_cpu, default=stock)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_fast_conv.defvjp(_fast_conv_fwd, _fast_conv_bwd)


def conv_general_dilated(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision: Any = None,
  preferred_element_type: Any = None,
) -> jax.Array:
  """`jax.lax.conv_general_dilated` with a chunked kernel gradient on CPU (see module doc).

  Takes the same arguments. 2-D NHWC/HWIO convolutions without dilation or
  groups use the fast backward pass; anything else is passed to `lax` unchanged.
  """
  plain = (
    lhs.ndim == 4
    and feature_group_count == 1
    and batch_group_count == 1
    and all(d == 1 for d in (lhs_dilation or (1, 1)))
    and all(d == 1 for d in (rhs_dilation or (1, 1)))
    and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  )
  if not plain:
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count,
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
  strides = tuple(int(s) for s in window_strides)
  pads = _explicit_padding(padding, lhs.shape, rhs.shape, strides)
  return _fast_conv(lhs, rhs, strides, pads, precision, preferred_element_type)


# `nn.Conv` with the fast kernel gradient; parameter names and shapes are unchanged.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)

# A layer constructor, e.g. `Conv` or a `functools.partial` of `nn.BatchNorm`.
ModuleDef = Callable[..., nn.Module]


def with_dtypes(net: nn.Module, layer: ModuleDef, **defaults: Any) -> ModuleDef:
  """``layer`` computing in ``net.dtype`` with parameters in ``net.param_dtype``.

  A network builds its convolutions (or dense layers) from one such partial and
  hands it to its blocks, so the dtypes are spelled once per network.

  Args:
    net: the network; only its ``dtype`` and ``param_dtype`` attributes are read.
    layer: the layer class, e.g. `Conv` or ``nn.Dense``.
    **defaults: further default arguments, e.g. ``use_bias=False``, ``kernel_init``.

  Returns:
    A ``functools.partial`` of ``layer``; a call may override any default.

  Example:
    >>> from ec2t_jax.models.resnet_cifar import CifarResNet
    >>> conv = with_dtypes(CifarResNet(dtype=jnp.bfloat16), Conv, use_bias=False)
    >>> layer = conv(16, (3, 3))
    >>> layer.dtype == jnp.bfloat16, layer.use_bias
    (True, False)
  """
  return functools.partial(layer, dtype=net.dtype, param_dtype=net.param_dtype, **defaults)


def batch_norm(net: nn.Module, train: bool) -> ModuleDef:
  """``nn.BatchNorm`` with a network's BatchNorm settings, for it and its blocks to share.

  Args:
    net: the network; its ``bn_momentum``, ``bn_epsilon``, ``axis_name``,
      ``dtype`` and ``param_dtype`` attributes are read.
    train: normalize with the batch statistics and update the running averages
      in ``batch_stats`` if True, else normalize with the running averages.

  Returns:
    A ``functools.partial`` of ``nn.BatchNorm``; call it with ``name=...``.
  """
  return with_dtypes(
    net,
    nn.BatchNorm,
    use_running_average=not train,
    momentum=net.bn_momentum,
    epsilon=net.bn_epsilon,
    axis_name=net.axis_name,
  )


def round_filters(
  filters: int,
  width_mult: float,
  divisor: int = 8,
  min_depth: int | None = None,
) -> int:
  """Scales a channel count by ``width_mult`` and rounds it to a multiple of ``divisor``.

  The compound-scaling rule of the EfficientNet reference implementation
  (docs/algorithm.md §8)::

      f' = max(min_depth, int(f·w + divisor/2) // divisor · divisor)
      f' += divisor   if f' < 0.9·f·w      (never round down by more than 10 %)

  Args:
    filters: the unscaled channel count.
    width_mult: the width multiplier (``w**phi`` in compound scaling).
    divisor: the channel count is rounded to a multiple of this.
    min_depth: lower bound of the result; defaults to ``divisor``.

  Returns:
    The scaled channel count.

  Raises:
    ValueError: if ``width_mult`` or ``divisor`` is not positive.

  Example:
    >>> round_filters(64, 1.2**3.5)
    120
  """
  if width_mult <= 0:
    raise ValueError(f'width_mult must be > 0, got {width_mult}')
  if divisor <= 0:
    raise ValueError(f'divisor must be > 0, got {divisor}')
  min_depth = divisor if min_depth is None else min_depth
  scaled = filters * width_mult
  new_filters = max(min_depth, int(scaled + divisor / 2) // divisor * divisor)
  if new_filters < 0.9 * scaled:
    new_filters += divisor
  return int(new_filters)


def round_repeats(repeats: int, depth_mult: float) -> int:
  """Scales a block count by ``depth_mult``, rounding up: ``ceil(depth_mult · repeats)``.

  Args:
    repeats: the unscaled number of blocks.
    depth_mult: the depth multiplier (``d**phi`` in compound scaling).

  Returns:
    The scaled number of blocks.

  Raises:
    ValueError: if ``depth_mult`` is not positive.

  Example:
    >>> round_repeats(7, 1.4**3.5)
    23
  """
  if depth_mult <= 0:
    raise ValueError(f'depth_mult must be > 0, got {depth_mult}')
  return int(math.ceil(depth_mult * repeats))
