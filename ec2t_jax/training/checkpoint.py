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

import errno
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ec2t_jax import tree_util

# The file orbax writes into every checkpoint directory it finalizes.
_METADATA = '_CHECKPOINT_METADATA'


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


def _best_key(metrics: dict[str, float]) -> float:
  """Orders best checkpoints: by rank (the pass), then by validation accuracy in [0, 1]."""
  return 2.0 * metrics.get('rank', 0) + metrics['val_accuracy']


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
    max_to_keep: how many periodic checkpoints to keep (>= 1).
    cleanup_tmp: remove the temporary directories of saves that never
      finished (a run killed while writing). Only the run that holds the
      workdir may do this: a reader would delete a save in progress.

  Raises:
    ValueError: for `max_to_keep` < 1.
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 3, cleanup_tmp: bool = False):
    if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
      raise ValueError(
        f'max_to_keep must be an integer >= 1 (checkpoints kept on disk), got {max_to_keep!r}'
      )

    self.workdir = workdir

    def manager(name, **options):
      return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, name)),
        options=ocp.CheckpointManagerOptions(
          create=True,
          enable_async_checkpointing=False,
          cleanup_tmp_directories=cleanup_tmp,
          **options,
        ),
        item_names=('state', 'extra'),
      )

    # The periodic checkpoints are rotated by `_rotate`, which counts only complete
    # checkpoints: orbax's own rotation counts any directory named like a step.
    self._max_to_keep = max_to_keep
    self._manager = manager('checkpoints')
    self._best = manager('best', max_to_keep=1, best_fn=_best_key, best_mode='max')
    self._strangers_named: set[str] = set()

  def _complete(self, step: int) -> bool:
    """Whether `checkpoints/<step>` is an orbax checkpoint (it has orbax's metadata file)."""
    path = os.path.join(str(self._manager.directory), str(step), _METADATA)
    return os.path.isfile(path)

  def steps(self) -> list[int]:
    """Steps of the periodic checkpoints on disk, oldest first (strangers left out, with a warning).

    A directory named like a step that is no complete checkpoint (an empty
    `checkpoints/1000`, a half-copied one) is never counted, restored or deleted.
    """
    self._manager.reload()
    steps, strangers = [], []
    for step in sorted(self._manager.all_steps()):
      (steps if self._complete(step) else strangers).append(step)
    for step in strangers:
      path = os.path.join(str(self._manager.directory), str(step))
      if path not in self._strangers_named:
        self._strangers_named.add(path)
        logging.warning(
          '%s is not a complete checkpoint (no %s); it is ignored, never deleted: move it out of '
          'the checkpoints directory',
          path,
          _METADATA,
        )
    return steps

  def _rotate(self, written: int) -> None:
    """Deletes the oldest complete checkpoints beyond `max_to_keep` (never strangers).

    A deletion that fails is a warning naming the checkpoint: checkpoint `written`
    is on disk, so the run goes on.
    """
    # orbax's delete synchronizes the processes: every process deletes the same steps, those
    # the first process lists (another may list before or after a deletion becomes visible).
    for step in _agreed(self.steps()[: -self._max_to_keep]):
      try:
        self._manager.delete(step)
      except Exception as e:  # noqa: BLE001 - orbax and the filesystem raise many types.
        logging.warning(
          'checkpoint %d was written, but removing the old checkpoint %s failed (%s: %s); '
          'remove it by hand',
          written,
          os.path.join(str(self._manager.directory), str(step)),
          type(e).__name__,
          ' '.join(str(e).split())[:200],
        )

  def _write(self, manager: ocp.CheckpointManager, step: int, **kwargs: Any) -> None:
    """One orbax save; a failed write is an `OSError` naming the step and what is kept."""
    try:
      _clear_step(manager, step)
      manager.save(step, force=True, **kwargs)
      manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types.
      kept = sorted(manager.all_steps())
      first_line = ' '.join(str(e).split())[:300]
      raise OSError(
        getattr(e, 'errno', None) or errno.EIO,
        f'checkpoint {step} could not be written to {str(manager.directory)!r} '
        f'({type(e).__name__}: {first_line}); the checkpoints on disk ({kept or "none"}) are '
        'intact: free space or fix the filesystem, then rerun the same command to resume',
      ) from e

  def save(self, step: int, state: Any, extra: dict[str, Any]) -> None:
    """Saves `state` (any pytree of arrays) and JSON `extra` as checkpoint `step`.

    Raises:
      OSError: if the write fails (disk full, read-only filesystem, ...).
    """
    self._write(self._manager, step, args=_save_args(state, extra))
    self._rotate(step)

  def save_best(
    self, step: int, state: Any, extra: dict[str, Any], val_accuracy: float, *, rank: int = 0
  ) -> None:
    """Offers checkpoint `step` to the best-by-validation slot.

    A higher `rank` always wins over a lower one, whatever the accuracies: the
    trainer passes the pass number, so the slot holds the best checkpoint of
    the newest pass (a later pass compresses more, and may score lower than
    an earlier one).

    Raises:
      OSError: if the write fails.
    """
    self._write(
      self._best,
      step,
      args=_save_args(state, extra),
      metrics={'val_accuracy': float(val_accuracy), 'rank': int(rank)},
    )

  def best_step(self) -> int | None:
    """The step held in the best slot, or None."""
    try:
      self._best.reload()
      return self._best.best_step()
    except Exception as e:  # noqa: BLE001 - a damaged metrics file: orbax raises JSON errors.
      raise ValueError(
        f'the best checkpoint in {str(self._best.directory)!r} cannot be read '
        f'({type(e).__name__}: {" ".join(str(e).split())[:200]}); restore or remove it'
      ) from e

  def read_extra(self, step: int) -> dict[str, Any]:
    """The JSON item of periodic checkpoint `step`."""
    restored = self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
    return dict(restored['extra'])

  def restore(self, step: int, target: Any, *, best: bool = False) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint `step` into the structure (and shardings) of `target`.

    Raises:
      ValueError: if the checkpoint cannot be read (missing or damaged files), or
        its leaves do not match `target`'s.
    """
    manager = self._best if best else self._manager
    try:
      restored = manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(target)),
          extra=ocp.args.JsonRestore(),
        ),
      )
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types.
      first_line = ' '.join(str(e).split())[:200]
      raise ValueError(
        f'checkpoint {step} in {str(manager.directory)!r} cannot be read '
        f'({type(e).__name__}: {first_line})'
      ) from e
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
  """Writes model variables (`{'params': ..., 'batch_stats': ...}`) as an orbax checkpoint.

  Raises:
    OSError: if the write fails (disk full, read-only filesystem, ...).
  """
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.abspath(path), variables, force=True)
  except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types.
    raise OSError(
      getattr(e, 'errno', None) or errno.EIO,
      f'{path!r} could not be written ({type(e).__name__}: {" ".join(str(e).split())[:300]}); '
      'free space or fix the filesystem, then rerun the same command to resume',
    ) from e


def load_variables(path: str) -> Any:
  """Reads variables written by `save_variables` (nested dicts of numpy arrays)."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'no orbax checkpoint directory at {path}')
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(path)
  except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types.
    raise ValueError(
      f'{path!r} cannot be read as variables written by save_variables '
      f'({type(e).__name__}: {" ".join(str(e).split())[:200]})'
    ) from e


def _agreed(steps: list[int]) -> list[int]:
  """`steps` as the first process has them, in every process (itself with one process)."""
  if jax.process_count() == 1:
    return steps
  from jax.experimental import multihost_utils

  count = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
  mine = np.full(count, -1, np.int32)
  mine[: min(count, len(steps))] = steps[:count]
  return [int(s) for s in multihost_utils.broadcast_one_to_all(mine)]
