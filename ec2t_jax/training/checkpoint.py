"""Checkpoints of a training run: every orbax call of `ec2t_jax`, and only orbax calls.

A checkpoint holds two items:

* `state`: the train state's leaves as a flat dict `{'00000': array, ...}` in
  JAX flattening order. Restoring unflattens them with the tree structure of
  the state the trainer builds for that step's phase, so any optimizer state
  (EC2T NamedTuples, `optax.MaskedNode` placeholders) round-trips exactly.
* `extra`: JSON (the data iterator's position, the leaf paths, run metadata).

`workdir/checkpoints` keeps the newest `max_to_keep`; `workdir/best` keeps the
one with the best validation accuracy.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from ec2t_jax import tree_util


def _flat(tree: Any) -> tuple[dict[str, Any], list[str]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return (
    {f'{i:05d}': leaf for i, (_, leaf) in enumerate(flat)},
    [tree_util.path_str(p) for p, _ in flat],
  )


def _save_args(state: Any, extra: dict[str, Any]) -> ocp.args.Composite:
  flat, paths = _flat(state)
  return ocp.args.Composite(
    state=ocp.args.StandardSave(flat), extra=ocp.args.JsonSave({**extra, 'paths': paths})
  )


def _abstract(tree: Any) -> dict[str, Any]:
  leaves = jax.tree.leaves(tree)

  def spec(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None))

  return {f'{i:05d}': spec(x) for i, x in enumerate(leaves)}


def _clear_step(manager: ocp.CheckpointManager, step: int) -> None:
  """Removes checkpoint `step` before it is written again.

  A resumed run only reaches a step that is already on disk when it had to fall
  back to an older checkpoint (the newer one could not be restored) and now
  recomputes that step bit for bit, so replacing it loses nothing.
  """
  manager.reload()
  if step in manager.all_steps():
    logging.warning('replacing checkpoint %d in %s', step, manager.directory)
    manager.delete(step)


class Checkpointer:
  """Periodic and best-by-validation checkpoints of one workdir.

  Args:
    workdir: the run's directory.
    max_to_keep: how many periodic checkpoints to keep.
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 3):
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    self._manager = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')),
      options=options,
      item_names=('state', 'extra'),
    )
    best_options = ocp.CheckpointManagerOptions(
      max_to_keep=1,
      create=True,
      best_fn=lambda metrics: metrics['val_accuracy'],
      best_mode='max',
      enable_async_checkpointing=False,
    )
    self._best = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'best')),
      options=best_options,
      item_names=('state', 'extra'),
    )

  def steps(self) -> list[int]:
    """Steps of the periodic checkpoints on disk, oldest first."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, extra: dict[str, Any]) -> None:
    """Saves `state` (any pytree of arrays) and JSON `extra` as checkpoint `step`."""
    _clear_step(self._manager, step)
    self._manager.save(step, args=_save_args(state, extra), force=True)
    self._manager.wait_until_finished()

  def save_best(self, step: int, state: Any, extra: dict[str, Any], val_accuracy: float) -> None:
    """Offers checkpoint `step` to the best-by-validation slot."""
    _clear_step(self._best, step)
    self._best.save(
      step,
      args=_save_args(state, extra),
      metrics={'val_accuracy': float(val_accuracy)},
      force=True,
    )
    self._best.wait_until_finished()

  def best_step(self) -> int | None:
    """The step held in the best slot, or None."""
    self._best.reload()
    return self._best.best_step()

  def read_extra(self, step: int) -> dict[str, Any]:
    """The JSON item of periodic checkpoint `step`."""
    restored = self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
    return dict(restored['extra'])

  def restore(self, step: int, target: Any, *, best: bool = False) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint `step` into the structure (and shardings) of `target`.

    Raises:
      ValueError: if the checkpoint's leaves do not match `target`'s.
    """
    manager = self._best if best else self._manager
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(target)),
        extra=ocp.args.JsonRestore(),
      ),
    )
    leaves = [restored['state'][k] for k in sorted(restored['state'])]
    treedef = jax.tree.structure(target)
    if len(leaves) != treedef.num_leaves:
      raise ValueError(
        f'checkpoint {step} has {len(leaves)} leaves, the train state has {treedef.num_leaves}'
      )
    return jax.tree.unflatten(treedef, leaves), dict(restored['extra'])

  def restore_latest(
    self, target_for_step: Any
  ) -> tuple[int, Any, dict[str, Any]] | tuple[None, None, None]:
    """Restores the newest checkpoint that reads back intact, falling back to older ones.

    Args:
      target_for_step: `step -> target pytree` (the phase decides the state's structure).

    Returns:
      `(step, state, extra)`, or `(None, None, None)` if no checkpoint is usable.
    """
    for step in reversed(self.steps()):
      try:
        state, extra = self.restore(step, target_for_step(step))
        return step, state, extra
      except Exception as e:  # noqa: BLE001 - any read failure means "try an older one".
        logging.warning(
          'checkpoint %d in %s cannot be restored (%s: %s); trying an older one.',
          step,
          self._manager.directory,
          type(e).__name__,
          str(e).splitlines()[0][:200] if str(e) else '',
        )
    return None, None, None

  def close(self) -> None:
    """Waits for pending writes and releases the managers."""
    self._manager.close()
    self._best.close()


def save_variables(path: str, variables: Any) -> None:
  """Writes model variables (`{'params': ..., 'batch_stats': ...}`) as an orbax checkpoint."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), variables, force=True)


def load_variables(path: str) -> Any:
  """Reads variables written by `save_variables` (nested dicts of numpy arrays)."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'no orbax checkpoint directory at {path}')
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path)
