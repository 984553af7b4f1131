"""Knowledge distillation from a teacher's logits: pure functions, for any training loop.

The student learns from the labels and from the teacher's softened outputs
(Hinton et al., 2015):

    loss = (1 - w) · CE(labels, s) + w · T² · KL(softmax(t / T) || softmax(s / T))

with student logits `s`, teacher logits `t`, temperature `T` and weight `w`.
The factor T² keeps the soft term's gradient on the scale of the hard term's:
per example, the gradient with respect to the student's logits is

    (1 - w) · (softmax(s) - onehot(labels)) + w · T · (softmax(s / T) - softmax(t / T)).

The teacher is a constant (its logits are not differentiated). The functions
take logits only, so they serve linen, NNX and plain-JAX loops alike:

    >>> import jax.numpy as jnp
    >>> s = jnp.array([[2.0, 0.0, -1.0]]); t = jnp.array([[1.0, 0.5, -1.0]])
    >>> loss = distillation_loss(s, t, jnp.array([0]), temperature=2.0, weight=0.5)
    >>> loss.shape
    (1,)

`ec2t_jax.training` uses them for `config.distill` (`docs/training.md`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ['check_distillation', 'distillation_loss', 'soft_kl']


def check_distillation(temperature: float, weight: float) -> None:
  """Refuses a temperature that is not finite and > 0, or a weight outside [0, 1].

  Raises:
    ValueError: one line naming the bad value and the valid range.
  """
  if (
    not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0
  ):
    raise ValueError(f'distillation temperature={temperature!r}; valid: a finite number > 0')
  if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
    raise ValueError(f'distillation weight={weight!r}; valid: a number in [0, 1]')


def soft_kl(
  student_logits: jax.Array, teacher_logits: jax.Array, temperature: jax.typing.ArrayLike
) -> jax.Array:
  """Per-example KL(softmax(t / T) || softmax(s / T)) over the last axis, in float32.

  Zero where the student's logits equal the teacher's; the teacher's logits
  are held constant (`jax.lax.stop_gradient`).
  """
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  log_p_t = jax.nn.log_softmax(t, axis=-1)
  log_p_s = jax.nn.log_softmax(s, axis=-1)
  return jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)


def distillation_loss(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  labels: jax.Array,
  *,
  temperature: jax.typing.ArrayLike,
  weight: jax.typing.ArrayLike,
) -> jax.Array:
  """Per-example `(1 - w)·CE(labels, s) + w·T²·KL(softmax(t/T) || softmax(s/T))`.

  Args:
    student_logits: `(..., num_classes)` logits being trained.
    teacher_logits: the teacher's logits for the same inputs, same shape.
    labels: integer class labels, `student_logits.shape[:-1]`.
    temperature: T > 0 (a Python number or a traced scalar).
    weight: w in [0, 1]; 0 is the plain cross-entropy.

  Returns:
    The loss of each example (float32), shape `labels.shape`; average it yourself.

  Raises:
    ValueError: for logits of different shapes.
  """
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
      f'student logits {student_logits.shape} and teacher logits {teacher_logits.shape} differ '
      'in shape; the teacher must map the same inputs to the same classes'
    )
  s = student_logits.astype(jnp.float32)
  hard = -jnp.take_along_axis(jax.nn.log_softmax(s, axis=-1), labels[..., None], axis=-1)[..., 0]
  soft = soft_kl(s, teacher_logits, temperature)
  return (1.0 - weight) * hard + weight * jnp.square(temperature) * soft
