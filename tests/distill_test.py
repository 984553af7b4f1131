"""The distillation loss: a hand computation, its gradient, and its edge cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ec2t_jax import distill


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _hand(s, t, labels, temperature, weight):
  """The loss per example in float64 NumPy, term by term."""
  p = _softmax(s)
  hard = -np.log(p[np.arange(len(labels)), labels])
  p_t, p_s = _softmax(t / temperature), _softmax(s / temperature)
  kl = np.sum(p_t * (np.log(p_t) - np.log(p_s)), -1)
  return (1 - weight) * hard + weight * temperature**2 * kl


def _logits(seed, shape=(5, 7)):
  rng = np.random.default_rng(seed)
  return rng.normal(0, 2, shape), rng.normal(0, 2, shape), rng.integers(0, shape[-1], shape[0])


@pytest.mark.parametrize('temperature, weight', [(1.0, 0.5), (4.0, 0.9), (2.5, 0.0), (3.0, 1.0)])
def test_loss_equals_a_hand_computation(temperature, weight):
  s, t, labels = _logits(0)
  got = distill.distillation_loss(
    jnp.asarray(s, jnp.float32),
    jnp.asarray(t, jnp.float32),
    jnp.asarray(labels),
    temperature=temperature,
    weight=weight,
  )
  # float32 softmax and logs of logits of size ~2: relative error ~1e-6, bounded by 1e-5.
  np.testing.assert_allclose(got, _hand(s, t, labels, temperature, weight), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('temperature, weight', [(1.0, 0.3), (4.0, 0.7)])
def test_gradient_is_the_textbook_formula(temperature, weight):
  s, t, labels = (jnp.asarray(x) for x in _logits(1))
  s, t = s.astype(jnp.float32), t.astype(jnp.float32)

  def one(s_i, t_i, y_i):
    return distill.distillation_loss(
      s_i[None], t_i[None], y_i[None], temperature=temperature, weight=weight
    )[0]

  grads = jax.vmap(jax.grad(one))(s, t, labels)  # Per example, before any averaging.
  onehot = jax.nn.one_hot(labels, s.shape[-1])
  expected = (1 - weight) * (jax.nn.softmax(s) - onehot) + weight * temperature * (
    jax.nn.softmax(s / temperature) - jax.nn.softmax(t / temperature)
  )
  np.testing.assert_allclose(grads, expected, rtol=1e-5, atol=1e-6)
  # The teacher is a constant: no gradient flows to its logits.
  teacher_grad = jax.grad(lambda t_: one(s[0], t_, labels[0]))(t[0])
  np.testing.assert_array_equal(teacher_grad, np.zeros_like(teacher_grad))


def test_a_teacher_equal_to_the_student_adds_nothing():
  s, _, labels = _logits(2)
  s = jnp.asarray(s, jnp.float32)
  np.testing.assert_allclose(distill.soft_kl(s, s, 3.0), 0.0, atol=1e-6)
  hard = distill.distillation_loss(s, s, jnp.asarray(labels), temperature=3.0, weight=0.0)
  mixed = distill.distillation_loss(s, s, jnp.asarray(labels), temperature=3.0, weight=0.4)
  np.testing.assert_allclose(mixed, 0.6 * hard, rtol=1e-5, atol=1e-6)


def test_weight_zero_is_the_cross_entropy():
  s, t, labels = _logits(3)
  got = distill.distillation_loss(
    jnp.asarray(s, jnp.float32),
    jnp.asarray(t, jnp.float32),
    jnp.asarray(labels),
    temperature=2.0,
    weight=0.0,
  )
  expected = -np.log(_softmax(s)[np.arange(len(labels)), labels])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_refusals_name_the_bad_value():
  s = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match=r'student logits \(2, 3\) and teacher logits \(2, 4\)'):
    distill.distillation_loss(s, jnp.zeros((2, 4)), jnp.zeros(2, int), temperature=1.0, weight=0.5)
  with pytest.raises(ValueError, match=r'temperature=0.0; valid: a finite number > 0'):
    distill.check_distillation(0.0, 0.5)
  with pytest.raises(ValueError, match=r'weight=1.5; valid: a number in \[0, 1\]'):
    distill.check_distillation(2.0, 1.5)
