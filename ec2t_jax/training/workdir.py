"""A run's workdir: its config file, the claim check before training, reading it back.

`load_workdir(path)` reads a finished (or stopped) run without its dataset:
the config, the model, the variables and EC2T state of a checkpoint, the
compression masks and the schedule. The command-line tools (`scoring`,
`export`, `report`) read runs through it; it does not import the trainer.

Example:
  >>> run = load_workdir('workdir/mnist')                      # doctest: +SKIP
  >>> logits = run.model.apply(run.variables, images, train=False)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
from jax.experimental import multihost_utils

from ec2t_jax.training import checkpoint as checkpoint_lib
from ec2t_jax.training import schedule as schedule_lib
from ec2t_jax.training import state as state_lib

__all__ = [
  'RESUMABLE_FIELDS',
  'Workdir',
  'claim_workdir',
  'config_from_workdir',
  'flat_config',
  'load_workdir',
  'write_json',
]

# Fields that may differ between the first run and a resume of the same job (and,
# for process_id, between the processes of one multi-process run).
RESUMABLE_FIELDS = (
  'overwrite',
  'log_every_steps',
  'checkpoint_every_steps',
  'data_dir',
  'worker_count',
  'process_id',
  'coordinator_address',
  'compilation_cache_dir',
)


class Workdir(NamedTuple):
  """A trained run read back from its workdir (see `load_workdir`).

  Attributes:
    config: the config the run was started with.
    model: its linen module.
    variables: `{'params', 'batch_stats'}` of the checkpoint.
    opt_state: the optimizer state (the EC2T state after the full-precision stage).
    step: the checkpoint's step.
    ternary_mask: bools shaped like the params: the ternary leaves.
    prune_mask: bools of the pruned (ECP) leaves, or None.
    image_shape: one input image, `(height, width, channels)`.
    num_classes: the classifier's outputs.
    schedule: the run's `Schedule` (its stages and their steps).
    normalization: per-channel `(mean, std)` the run's input pipeline applied to
      images scaled to [0, 1], or None for checkpoints of older versions whose
      dataset registers none.
  """

  config: ml_collections.ConfigDict
  model: Any
  variables: dict[str, Any]
  opt_state: Any
  step: int
  ternary_mask: Any
  prune_mask: Any
  image_shape: tuple[int, ...]
  num_classes: int
  schedule: schedule_lib.Schedule
  normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None


def flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """`{'ec2t.gamma': 0.15, ...}`: a config as one flat, JSON-friendly dict."""
  out = {}

  def walk(prefix, node):
    for key, value in node.items():
      name = f'{prefix}{key}'
      if isinstance(value, (ml_collections.ConfigDict, Mapping)):
        walk(name + '.', value)
      else:
        out[name] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)

  walk('', config)
  return out


def write_json(path: str, value: Any) -> None:
  """Writes JSON through a temporary file: never a half-written file, even after SIGKILL."""
  with open(f'{path}.tmp', 'w') as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(f'{path}.tmp', path)


def claim_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks the workdir is writable and holds no run of a different config, then claims it.

  Raises:
    ValueError: for a workdir that cannot be created or written, or one whose
      `config.json` differs from `config` in a field that is not resumable
      (unless `config.overwrite`).
  """
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f'workdir {workdir!r} cannot be created: {e.strerror}') from e
  if not os.access(workdir, os.W_OK):
    raise ValueError(f'workdir {workdir!r} is not writable; pass a --workdir you can write to')
  path = os.path.join(workdir, 'config.json')
  mine = {k: v for k, v in flat_config(config).items() if k not in RESUMABLE_FIELDS}
  if os.path.exists(path) and not config.get('overwrite', False):
    with open(path) as f:
      theirs = {k: v for k, v in json.load(f).items() if k not in RESUMABLE_FIELDS}
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
      shown = ', '.join(f'{k}: {theirs.get(k)!r} -> {mine.get(k)!r}' for k in diff[:5])
      raise ValueError(
        f'workdir {workdir!r} holds a run of a different config ({shown}); use another '
        '--workdir, or --config.overwrite=True to start over there'
      )
  if jax.process_count() > 1:
    # Every process has read the workdir as it was; only now may process 0 change it.
    # (A process that read process 0's fresh config.json could decide differently.)
    multihost_utils.sync_global_devices('ec2t_jax:workdir_checked')
  if jax.process_index() == 0:
    write_json(path, flat_config(config))


def config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was started with (`workdir/config.json`)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir!r} holds no config.json: is it a workdir of main.py?')
  with open(path) as f:
    flat = json.load(f)
  nested: dict[str, Any] = {}
  for key, value in flat.items():
    node = nested
    *parents, leaf = key.split('.')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  nested.setdefault('model_kwargs', {})
  return ml_collections.ConfigDict(nested)


def _data_facts(config: ml_collections.ConfigDict, extra: Mapping[str, Any]):
  """`(steps_per_epoch, num_classes, image_shape)` from a checkpoint's extra data."""
  if {'num_classes', 'image_shape'} <= set(extra):
    num_classes, image_shape = int(extra['num_classes']), tuple(extra['image_shape'])
  else:  # Checkpoints of older versions: the dataset's registry entry (imports tfds).
    from ec2t_jax.training import datasets

    num_classes, image_shape = datasets.classes_and_shape(config)
  if 'steps_per_epoch' in extra:
    return int(extra['steps_per_epoch']), num_classes, image_shape
  from ec2t_jax.training import train  # Older still: count the dataset (grain too).

  return train.open_data(config).steps_per_epoch, num_classes, image_shape


def _normalization(config: ml_collections.ConfigDict, extra: Mapping[str, Any]):
  """The run's input normalization from a checkpoint, else the dataset's registered one."""
  if 'normalization' in extra:
    mean, std = extra['normalization']
    return tuple(map(float, mean)), tuple(map(float, std))
  try:  # Checkpoints of older versions (imports tfds).
    from ec2t_jax.training import datasets

    normalization = datasets.get_spec(config.dataset).normalization
  except (ValueError, ImportError):
    return None
  return None if normalization is None else (tuple(normalization[0]), tuple(normalization[1]))


def load_workdir(workdir: str, *, best: bool = False) -> Workdir:
  """Reads the newest (or the best-by-validation) checkpoint of a run, without its dataset.

  Args:
    workdir: a directory written by `ec2t_jax.training.train.train_and_evaluate`.
    best: read the best-by-validation checkpoint instead of the newest.

  Returns:
    A `Workdir` with the config, the linen module, `{'params', 'batch_stats'}`,
    the optimizer state, the step, the compression masks and the schedule.

  Raises:
    FileNotFoundError: for a directory without config.json or without the
      requested checkpoint.
  """
  config = config_from_workdir(workdir)
  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.get('max_to_keep', 3))
  try:
    if best:
      step = ckpt.best_step()
      if step is None:
        raise FileNotFoundError(f'{workdir!r} has no best-by-validation checkpoint')
    else:
      steps = ckpt.steps()
      if not steps:
        raise FileNotFoundError(f'{workdir!r} has no checkpoint')
      step = steps[-1]
    extra = ckpt.read_extra(ckpt.steps()[-1])
    steps_per_epoch, num_classes, image_shape = _data_facts(config, extra)
    normalization = _normalization(config, extra)
    schedule = schedule_lib.create_schedule(config, steps_per_epoch)
    setup = state_lib.create_setup(
      config, schedule, num_classes=num_classes, image_shape=image_shape, load_pretrained=False
    )
    target = state_lib.state_tree(state_lib.abstract_train_state(setup, step))
    tree, _ = ckpt.restore(step, target, best=best)
  finally:
    ckpt.close()
  return Workdir(
    config=config,
    model=setup.model,
    variables={'params': tree['params'], 'batch_stats': tree['batch_stats']},
    opt_state=tree['opt_state'],
    step=int(step),
    ternary_mask=setup.ternary_mask,
    prune_mask=setup.prune_mask,
    image_shape=setup.image_shape,
    num_classes=num_classes,
    schedule=schedule,
    normalization=normalization,
  )
