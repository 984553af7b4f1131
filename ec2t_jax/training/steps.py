"""The computations a run compiles: a training step, several steps in one call, evaluation.

`train_step` is one optimization step. `scan_steps` runs k of them in one
call (`config.steps_per_call`), a `jax.lax.scan` over k stacked batches, so
that an accelerator waits for the host once per k steps instead of every
step; the steps are the same computation with the same random keys, so a
run's results do not depend on k (up to float32 rounding: the compiled
programs differ).

With a teacher (`config.distill`), `train_step` runs the teacher's forward
pass in eval mode on the same batch and trains on
`ec2t_jax.distillation_loss` instead of the cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ec2t_jax import distill
from ec2t_jax.training import setup as setup_lib
from ec2t_jax.training.runtime import to_global

__all__ = [
  'default_unroll',
  'eval_step',
  'evaluate',
  'loss_and_accuracy',
  'scan_steps',
  'step_rng',
  'train_step',
]


def loss_and_accuracy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-example cross-entropy and correctness (float32) of `logits` for integer `labels`."""
  logits = logits.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return loss, (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


def step_rng(base_rng: jax.Array, step: jax.typing.ArrayLike) -> jax.Array:
  """The dropout key of global step `step` (the same whether steps run one or k per call)."""
  return jax.random.fold_in(base_rng, step)


def train_step(
  state: setup_lib.TrainState,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  teacher: tuple[Any, jax.Array, jax.Array] | None = None,
  *,
  skip_nonfinite: bool,
  teacher_apply: Callable[..., jax.Array] | None = None,
) -> tuple[setup_lib.TrainState, dict[str, jax.Array]]:
  """One optimization step; returns the new state and this step's metrics.

  Args:
    state: the train state.
    batch: `{'image', 'label'}`.
    rng: the step's dropout key.
    teacher: None, or `(teacher_variables, temperature, weight)` to distill
      (with `teacher_apply`, the teacher module's `apply`).
    skip_nonfinite: keep the old state where the loss or a gradient is NaN/inf.
    teacher_apply: the teacher's `apply` (static; bind it with `functools.partial`).
  """
  teacher_logits = None
  if teacher is not None:
    teacher_variables, temperature, weight = teacher
    teacher_logits = teacher_apply(teacher_variables, batch['image'], train=False)

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    logits, updates = state.apply_fn(
      variables, batch['image'], train=True, mutable=['batch_stats'], rngs={'dropout': rng}
    )
    loss, correct = loss_and_accuracy(logits, batch['label'])
    if teacher_logits is not None:
      loss = distill.distillation_loss(
        logits, teacher_logits, batch['label'], temperature=temperature, weight=weight
      )
    return loss.mean(), (correct.mean(), updates.get('batch_stats', state.batch_stats))

  (loss, (accuracy, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  finite = jnp.isfinite(loss) & jnp.all(
    jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
  )
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if skip_nonfinite:
    new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
  metrics = {'loss': loss, 'accuracy': accuracy, 'nonfinite': (~finite).astype(jnp.float32)}
  return new_state, metrics


def scan_steps(
  step_fn: Callable[..., tuple[Any, dict[str, jax.Array]]],
  state: setup_lib.TrainState,
  batches: dict[str, jax.Array],
  base_rng: jax.Array,
  first_step: jax.typing.ArrayLike,
  *extra: Any,
  unroll: bool = False,
) -> tuple[setup_lib.TrainState, dict[str, jax.Array]]:
  """`step_fn` applied to each of the k batches stacked on the leading axis of `batches`.

  Step i uses the key `step_rng(base_rng, first_step + i)`, as the i-th of k
  separate calls would. Returns the state after the k steps and the metrics of
  each step stacked on a leading axis of size k. `extra` arguments (a teacher)
  go to every step. `unroll=True` compiles the k steps one after another
  instead of as a loop: a program k times larger, but on CPU, where XLA runs
  loop bodies slower than straight-line code, faster per step
  (`default_unroll`).
  """
  k = jax.tree.leaves(batches)[0].shape[0]
  steps = jnp.asarray(first_step, jnp.uint32) + jnp.arange(k, dtype=jnp.uint32)

  def body(carry, xs):
    batch, step = xs
    return step_fn(carry, batch, step_rng(base_rng, step), *extra)

  return jax.lax.scan(body, state, (batches, steps), unroll=bool(unroll))


def default_unroll() -> bool:
  """Whether `scan_steps` unrolls on this backend: on CPU only (measured, `docs/benchmarks.md`).

  On CPU the k steps as a loop ran 4-13x slower per step than one step per
  call, unrolled 0.7-0.8x; on accelerators the loop keeps the compiled program
  the size of one step.
  """
  return jax.default_backend() == 'cpu'


def eval_step(state: setup_lib.TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Sums of loss, correct predictions and real examples over one (padded) batch."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  logits = state.apply_fn(variables, batch['image'], train=False)
  loss, correct = loss_and_accuracy(logits, batch['label'])
  mask = batch.get('mask', jnp.ones_like(loss, bool)).astype(jnp.float32)
  return {
    'loss': jnp.sum(loss * mask),
    'correct': jnp.sum(correct * mask),
    'count': jnp.sum(mask),
  }


def evaluate(p_eval_step, state, batches, sharding) -> dict[str, float]:
  """Mean accuracy and loss over `batches` (`{}` when there are none)."""
  totals = None
  for batch in batches:
    out = jax.device_get(p_eval_step(state, to_global(batch, sharding)))
    totals = out if totals is None else {k: totals[k] + out[k] for k in totals}
  if totals is None:
    return {}
  count = max(float(totals['count']), 1.0)
  return {'accuracy': float(totals['correct']) / count, 'loss': float(totals['loss']) / count}
