"""Building blocks shared by the model zoo.

`conv_general_dilated` is a drop-in replacement for `jax.lax.conv_general_dilated`
(flax's `nn.Conv` takes it as its `conv_general_dilated` attribute) whose
backward pass on CPU computes the kernel gradient over chunks of 16 images.

Why: XLA:CPU's kernel-gradient convolution (the inputs convolved with the
output gradients, contracting over batch and space) falls off a performance
cliff when the batch is large: on a 2-core x86 CPU, a 16-channel 3x3 layer at
32x32 and batch 128 takes 260 ms, 25x its forward pass, and the same work split
into 8 convolutions of 16 images takes 12 ms (docs/benchmarks.md). It
dominated the train step of every CNN here. On GPU and TPU the backward pass is
the stock one (`jax.lax.platform_dependent`), so results there do not change.

The forward pass and the input gradient are always the stock XLA convolutions.
Grouped or dilated convolutions fall back to `jax.lax.conv_general_dilated`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
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
