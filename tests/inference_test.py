"""Tests of `ec2t_jax.inference`: two accumulations + two products equal the dense layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ec2t_jax import inference, models
from ec2t_jax.training import workdir as workdir_lib


def _ternary(rng, shape, sparsity=0.5, w_p=0.37, w_n=0.21):
  a = rng.choice([-1, 0, 1], size=shape, p=[(1 - sparsity) / 2, sparsity, (1 - sparsity) / 2])
  return np.where(a > 0, w_p, np.where(a < 0, -w_n, 0.0)).astype(np.float32)


@pytest.mark.parametrize(
  'strides, padding, groups, dilation',
  [
    ((1, 1), 'SAME', 1, (1, 1)),
    ((2, 2), ((1, 1), (1, 1)), 1, (1, 1)),
    ((1, 2), 'VALID', 1, (2, 1)),
    ((1, 1), 'SAME', 4, (1, 1)),  # Grouped.
    ((2, 2), 'SAME', 8, (1, 1)),  # Depthwise.
  ],
)
def test_ternary_conv_matches_lax_conv(strides, padding, groups, dilation):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 9, 11, 8)).astype(np.float32)
  kernel = _ternary(rng, (3, 3, 8 // groups, 16))
  params = dict(
    window_strides=strides,
    padding=padding,
    rhs_dilation=dilation,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=groups,
  )
  dense = lax.conv_general_dilated(x, kernel, **params)
  ours = inference.ternary_conv(x, inference.decompose(kernel), **params)
  np.testing.assert_allclose(ours, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kernel_is_rhs', [True, False])
def test_ternary_dot_general_matches_matmul(kernel_is_rhs):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((5, 64)).astype(np.float32)
  kernel = _ternary(rng, (64, 10), sparsity=0.8)
  t = inference.decompose(kernel)
  if kernel_is_rhs:
    dense = x @ kernel
    ours = inference.ternary_dot_general(x, t, (((1,), (0,)), ((), ())))
  else:
    dense = kernel.T @ x.T
    ours = inference.ternary_dot_general(x.T, t, (((0,), (0,)), ((), ())), kernel_is_rhs=False)
  np.testing.assert_allclose(ours, dense, rtol=1e-5, atol=1e-5)


def test_decompose():
  t = inference.decompose(np.array([[0.5, 0.0], [-0.25, 0.5]], np.float32))
  assert (float(t.w_p), float(t.w_n)) == (0.5, 0.25)
  np.testing.assert_array_equal(t.pos, [[True, False], [False, True]])
  np.testing.assert_array_equal(t.neg, [[False, False], [True, False]])
  with pytest.raises(ValueError, match='2 distinct positive'):
    inference.decompose(np.array([0.5, 0.25, -0.1]))
  with pytest.raises(ValueError, match='int64 values are not floating point'):
    inference.decompose(np.array([1, 0, -1], np.int64))


def test_whole_trained_lenet(trained_workdir):
  run = workdir_lib.load_workdir(trained_workdir)
  x = jax.random.normal(jax.random.key(0), (3, 28, 28, 1))
  forward = inference.ternary_forward(run.model, run.variables, input_shape=x.shape)
  assert forward.ternary_layers == ['conv1/kernel', 'conv2/kernel', 'fc1/kernel', 'fc2/kernel']
  dense = run.model.apply(run.variables, x, train=False)
  np.testing.assert_allclose(forward(x), dense, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(forward(x), dense, rtol=1e-5, atol=1e-5)  # Jitted, second call.


def test_whole_ternary_resnet20_with_batchnorm(
  abstract_variables, synthetic_variables, is_body_conv
):
  model, shapes = abstract_variables('resnet20', 10)
  variables = synthetic_variables(shapes, 0.6, is_body_conv)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  forward = inference.ternary_forward(model, variables, input_shape=x.shape)
  assert len(forward.ternary_layers) == 18 and 'conv1/kernel' not in forward.ternary_layers
  np.testing.assert_allclose(
    forward(x), model.apply(variables, x, train=False), rtol=1e-4, atol=1e-5
  )


def test_bfloat16_model_and_mask():
  model = models.create('lenet5', num_classes=10, dtype=jnp.bfloat16)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 28, 28, 1)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  params = dict(variables['params'])
  params['fc1'] = {**params['fc1'], 'kernel': jnp.asarray(_ternary(rng, (400, 120)))}
  variables = {'params': params}
  out = inference.apply(model, variables, x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(out, np.float32),
    np.asarray(model.apply(variables, x), np.float32),
    rtol=0.05,
    atol=0.05,
  )
  mask = jax.tree.map(lambda _: False, params)
  mask['conv1'] = {**mask['conv1'], 'kernel': True}
  with pytest.raises(ValueError, match='params/conv1/kernel: kernel is not ternary'):
    inference.ternary_forward(model, variables, input_shape=x.shape, ternary_mask=mask)
