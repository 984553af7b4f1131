"""The CPU-fast convolution has the stock forward pass and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ec2t_jax.models import layers

NHWC = ('NHWC', 'HWIO', 'NHWC')


def _grads(conv, x, w):
  def loss(x, w):
    y = conv(x, w)
    return jnp.sum(y.astype(jnp.float32) * jnp.cos(jnp.arange(y.size).reshape(y.shape)))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)


@pytest.mark.parametrize(
  'batch,hw,cin,cout,kernel,strides,padding',
  [
    (12, 9, 3, 5, 3, 1, 'SAME'),
    (12, 9, 4, 6, 3, 2, ((1, 1), (1, 1))),
    (7, 8, 2, 3, 5, 1, 'VALID'),
    (6, 10, 3, 4, 1, 2, 'SAME'),
    (5, 11, 3, 2, 3, 3, ((2, 0), (0, 1))),
    (4, 6, 2, 2, 2, 1, ((-1, 1), (1, 0))),
  ],
)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_matches_stock_convolution(batch, hw, cin, cout, kernel, strides, padding, dtype):
  kx, kw = jax.random.split(jax.random.key(batch * hw))
  x = jax.random.normal(kx, (batch, hw, hw, cin), dtype)
  w = jax.random.normal(kw, (kernel, kernel, cin, cout), dtype)
  stock = functools.partial(
    lax.conv_general_dilated,
    window_strides=(strides, strides),
    padding=padding,
    dimension_numbers=NHWC,
  )
  fast = functools.partial(
    layers.conv_general_dilated,
    window_strides=(strides, strides),
    padding=padding,
    dimension_numbers=NHWC,
  )
  np.testing.assert_array_equal(np.asarray(fast(x, w)), np.asarray(stock(x, w)))
  (loss_s, (dx_s, dw_s)), (loss_f, (dx_f, dw_f)) = _grads(stock, x, w), _grads(fast, x, w)
  assert dx_f.dtype == dx_s.dtype == dtype and dw_f.dtype == dw_s.dtype == dtype
  np.testing.assert_array_equal(np.asarray(loss_f), np.asarray(loss_s))
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for fast_g, stock_g in ((dx_f, dx_s), (dw_f, dw_s)):
    a, b = np.asarray(fast_g, np.float32), np.asarray(stock_g, np.float32)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


def test_kernel_gradient_is_split_into_chunks_on_cpu():
  x = jnp.ones((8, 6, 6, 2))
  w = jnp.ones((3, 3, 2, 4))

  def grad_w(conv):
    return jax.grad(lambda w: conv(x, w, (1, 1), 'SAME', dimension_numbers=NHWC).sum())

  def convolutions(fn):
    return jax.jit(fn).lower(w).as_text().count('stablehlo.convolution')

  # One chunk of 8 images: as many convolutions as the stock gradient.
  stock = convolutions(grad_w(lax.conv_general_dilated))
  assert convolutions(grad_w(layers.conv_general_dilated)) == stock
  old = layers.CPU_KERNEL_GRAD_CHUNK
  try:
    layers.CPU_KERNEL_GRAD_CHUNK = 2  # 4 chunks of 2 images.
    jax.clear_caches()
    fast = grad_w(layers.conv_general_dilated)
    assert convolutions(fast) == stock + 3
    np.testing.assert_allclose(fast(w), grad_w(lax.conv_general_dilated)(w), rtol=1e-5, atol=1e-5)
  finally:
    layers.CPU_KERNEL_GRAD_CHUNK = old


@pytest.mark.parametrize(
  'kwargs',
  [
    {'feature_group_count': 2},
    {'rhs_dilation': (2, 2)},
    {'lhs_dilation': (2, 1), 'padding': ((1, 1), (1, 1))},
  ],
)
def test_other_convolutions_fall_back_to_lax(kwargs):
  x = jax.random.normal(jax.random.key(0), (2, 7, 7, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4 // kwargs.get('feature_group_count', 1), 6))
  kwargs = {'padding': 'SAME', **kwargs}
  stock = functools.partial(lax.conv_general_dilated, dimension_numbers=NHWC, **kwargs)
  fast = functools.partial(layers.conv_general_dilated, dimension_numbers=NHWC, **kwargs)
  for a, b in zip(
    jax.tree.leaves(_grads(lambda x, w: fast(x, w, (1, 1)), x, w)),
    jax.tree.leaves(_grads(lambda x, w: stock(x, w, (1, 1)), x, w)),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
