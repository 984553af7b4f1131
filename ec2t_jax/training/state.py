"""Model, optimizers and train state of a run, built from its config (no data needed).

`create_setup(config, schedule)` builds everything a run computes with: the
linen module, its initial (or pretrained) variables, the compression masks and
one optimizer per optimizer phase. `create_train_state` makes the flax
`TrainState` of a phase from variables. The trainer and the workdir reader
(`ec2t_jax.training.workdir`) both use these functions, so a checkpoint is
always restored into the state that wrote it.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

import ec2t_jax
from ec2t_jax import masks as masks_lib
from ec2t_jax import models, tree_util
from ec2t_jax.training import checkpoint as checkpoint_lib
from ec2t_jax.training import schedule as schedule_lib

__all__ = [
  'Setup',
  'TrainState',
  'abstract_train_state',
  'compression_masks',
  'create_ec2t_optimizer',
  'create_fp_optimizer',
  'create_model',
  'create_setup',
  'create_train_state',
  'initial_variables',
  'learning_rate_schedule',
  'load_init_from',
  'params_sha256',
  'state_tree',
  'with_state_tree',
]


class TrainState(train_state.TrainState):
  """A Flax `TrainState` with BatchNorm statistics; EC2T lives in `opt_state`."""

  batch_stats: Any = None


class Setup(NamedTuple):
  """What a run computes with, built once by `create_setup`.

  Attributes:
    model: the linen module.
    variables: `{'params', 'batch_stats'}` to start from (initial or pretrained).
    image_shape: one input image, `(height, width, channels)`.
    schedule: the run's `Schedule`.
    fp_tx: the optimizer of the full-precision stage.
    ec2t_tx: `ec2t_jax.ec2t` for the EC2T and frozen stages.
    ternary_mask: bools shaped like the params, the leaves EC2T ternarizes.
    prune_mask: bools of the leaves it prunes (ECP), or None.
  """

  model: Any
  variables: dict[str, Any]
  image_shape: tuple[int, ...]
  schedule: schedule_lib.Schedule
  fp_tx: optax.GradientTransformation
  ec2t_tx: optax.GradientTransformation
  ternary_mask: Any
  prune_mask: Any


def create_model(config: ml_collections.ConfigDict, num_classes: int):
  """The linen module of `config.model` (registered, or `'package.module:factory'`).

  Built with `num_classes`, the entries of `config.model_kwargs`, and bfloat16
  compute (`dtype`) if `config.half_precision`.
  """
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  kwargs = dict(config.get('model_kwargs') or {})
  return models.create(config.model, num_classes=num_classes, dtype=dtype, **kwargs)


def initial_variables(model, image_shape: tuple[int, ...], seed: int) -> dict[str, Any]:
  """`model.init` on a dummy batch: `{'params': ..., 'batch_stats': ...}` (float32)."""
  rng = jax.random.key(seed)

  @jax.jit
  def init(rng):
    return model.init({'params': rng, 'dropout': rng}, jnp.zeros((1, *image_shape)), train=False)

  variables = dict(init(rng))
  variables.setdefault('batch_stats', {})
  return {'params': variables['params'], 'batch_stats': variables['batch_stats']}


def learning_rate_schedule(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """`cfg.learning_rate` held constant or cosine-decayed over `num_steps` (`cfg.schedule`)."""
  lr = cfg.learning_rate
  name = cfg.get('schedule', 'constant')
  if name == 'constant':
    return optax.constant_schedule(lr)
  if name == 'cosine':
    return optax.cosine_decay_schedule(lr, max(num_steps, 1))
  raise ValueError(f"unknown schedule {name!r}; valid: 'constant', 'cosine'")


def create_fp_optimizer(cfg: ml_collections.ConfigDict, num_steps: int):
  """The full-precision stage's optimizer (`cfg` = `config.fp`), coupled L2 first."""
  schedule = learning_rate_schedule(cfg, num_steps)
  decay = optax.add_decayed_weights(cfg.weight_decay) if cfg.weight_decay else optax.identity()
  if cfg.optimizer == 'sgd':
    opt = optax.sgd(schedule, momentum=cfg.momentum, nesterov=cfg.nesterov)
  elif cfg.optimizer == 'adam':
    opt = optax.adam(schedule)
  else:
    raise ValueError(f"unknown config.fp.optimizer {cfg.optimizer!r}; valid: 'sgd', 'adam'")
  return optax.chain(decay, opt)


def compression_masks(
  cfg: ml_collections.ConfigDict, model, params: Any, image_shape: tuple[int, ...]
) -> tuple[Any, Any]:
  """The ternary and prune masks of `config.ec2t` for `params`.

  Without `cfg.ternary_pattern` the default selection finds the first and last
  layers in the order the model calls them (traced, so it does not depend on
  the params dict's key order).
  """
  if cfg.get('ternary_pattern'):
    ternary_mask = masks_lib.from_regex(params, cfg.ternary_pattern, cfg.get('ternary_exclude'))
  else:
    order = masks_lib.call_order(
      model, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32), train=False
    )
    ternary_mask = masks_lib.default_ternary_mask(
      params,
      order=order,
      keep_first=cfg.keep_first,
      keep_last=cfg.keep_last,
      keep_pattern=cfg.get('keep_pattern') or None,
    )
  prune_mask = None
  if cfg.get('prune_pattern'):
    prune_mask = masks_lib.from_regex(params, cfg.prune_pattern)
    prune_mask = jax.tree.map(lambda p, t: p and not t, prune_mask, ternary_mask)
  return ternary_mask, prune_mask


def create_ec2t_optimizer(
  cfg: ml_collections.ConfigDict, ternary_mask: Any, prune_mask: Any, freeze_at: int
):
  """`ec2t_jax.ec2t` configured by `config.ec2t`; the assignment freezes at update `freeze_at`."""
  return ec2t_jax.ec2t(
    ternary_mask,
    gamma=cfg.gamma,
    init_scale=cfg.init_scale,
    sustain=cfg.sustain,
    p0_min=cfg.p0_min,
    centroid_floor_std=cfg.centroid_floor_std,
    latent_optimizer=optax.adam(cfg.latent_learning_rate),
    centroid_optimizer=optax.adam(cfg.centroid_learning_rate),
    fp_optimizer=ec2t_jax.default_fp_optimizer(cfg.learning_rate, cfg.weight_decay),
    prune_mask=prune_mask,
    freeze_assignment_at=freeze_at,
    reference_parity=cfg.reference_parity,
    # The trainer stops on (or, with config.skip_nonfinite, skips and counts) a NaN/inf
    # step itself, for both stages alike.
    skip_nonfinite=False,
  )


def _check_variables(loaded: Any, expected: Any, source: str) -> None:
  """Raises one ValueError listing missing, extra and mis-shaped leaves."""
  got = {n: np.shape(x) for n, x in tree_util.named_leaves(loaded)}
  want = {n: np.shape(x) for n, x in tree_util.named_leaves(expected)}
  problems = [f'missing {n} {want[n]}' for n in sorted(set(want) - set(got))]
  problems += [f'unexpected {n} {got[n]}' for n in sorted(set(got) - set(want))]
  problems += [
    f'{n}: expected {want[n]}, found {got[n]}'
    for n in sorted(set(want) & set(got))
    if want[n] != got[n]
  ]
  if problems:
    raise ValueError(
      f'config.init_from={source!r} does not fit the model ({len(problems)} problems): '
      + '; '.join(problems[:6])
    )


def load_init_from(config: ml_collections.ConfigDict, expected: dict[str, Any]) -> dict[str, Any]:
  """Pretrained variables from `config.init_from` (orbax directory or PyTorch file).

  Raises:
    ValueError: naming `config.init_from` for a file or directory that cannot
      be read, holds no `params`, or does not fit the model.
    FileNotFoundError: if it does not exist.
    ImportError: for a PyTorch file without torch installed.
  """
  source = config.init_from
  try:
    if source.endswith(('.pt', '.pth')):
      from ec2t_jax.models import pytorch  # Local: torch is optional.

      kwargs = dict(config.get('model_kwargs') or {})
      loaded = pytorch.from_pytorch(source, config.model, num_classes=config.num_classes, **kwargs)
    else:
      loaded = checkpoint_lib.load_variables(source)
  except (ValueError, TypeError) as e:
    raise ValueError(f'config.init_from={source!r}: {e}') from e
  if not isinstance(loaded, Mapping) or not isinstance(loaded.get('params'), Mapping):
    raise ValueError(
      f"config.init_from={source!r} holds no 'params' collection; it must be a directory "
      'written by ec2t_jax.training.checkpoint.save_variables, or a .pt/.pth state_dict'
    )
  loaded = {'params': loaded['params'], 'batch_stats': loaded.get('batch_stats') or {}}
  _check_variables(loaded, expected, source)
  return jax.tree.map(lambda x, e: jnp.asarray(x, e.dtype), loaded, expected)


def create_setup(
  config: ml_collections.ConfigDict,
  schedule: schedule_lib.Schedule,
  *,
  num_classes: int,
  image_shape: tuple[int, ...],
  load_pretrained: bool = True,
) -> Setup:
  """Builds the model, its variables, masks and optimizers of a run, validating them.

  Args:
    config: the run's config.
    schedule: its schedule (the optimizers' step counts come from it).
    num_classes: classifier outputs.
    image_shape: one input image, `(height, width, channels)`.
    load_pretrained: read `config.init_from` (False when a checkpoint will
      replace the variables anyway).

  Raises:
    ValueError: for masks that select nothing or non-float leaves, an
      `init_from` that does not fit the model, or an unknown optimizer.
  """
  model = create_model(config, num_classes)
  variables = initial_variables(model, image_shape, config.seed)
  if load_pretrained and config.init_from:
    variables = load_init_from(config, variables)
  ternary_mask, prune_mask = compression_masks(config.ec2t, model, variables['params'], image_shape)
  # Validates the masks (selects something, floating leaves) before any step.
  ec2t_jax.param_labels(variables['params'], ternary_mask, prune_mask)
  fp = schedule.stage(schedule_lib.FP)
  ec2t = schedule.stage(schedule_lib.EC2T)
  return Setup(
    model=model,
    variables=variables,
    image_shape=tuple(image_shape),
    schedule=schedule,
    fp_tx=create_fp_optimizer(config.fp, fp.num_steps),
    # The EC2T optimizer's update count starts at the EC2T stage's first step.
    ec2t_tx=create_ec2t_optimizer(config.ec2t, ternary_mask, prune_mask, ec2t.num_steps),
    ternary_mask=ternary_mask,
    prune_mask=prune_mask,
  )


def create_train_state(setup: Setup, optimizer: str, variables: dict[str, Any]) -> TrainState:
  """A fresh `TrainState` for `optimizer` (`'fp'` or `'ec2t'`) from `variables`.

  An EC2T state starts ternarized: its params are the ternary network of the
  initial assignment (`ec2t_jax.ternarize`).
  """
  tx = setup.fp_tx if optimizer == schedule_lib.FP else setup.ec2t_tx
  state = TrainState.create(
    apply_fn=setup.model.apply,
    params=variables['params'],
    tx=tx,
    batch_stats=variables['batch_stats'],
  )
  if optimizer == schedule_lib.EC2T:
    state = state.replace(params=ec2t_jax.ternarize(state.params, state.opt_state))
  return state


def abstract_train_state(setup: Setup, step: int) -> TrainState:
  """Shapes and dtypes of the train state a checkpoint of `step` holds (nothing computed)."""
  optimizer = setup.schedule.optimizer_at(step)
  return jax.eval_shape(functools.partial(create_train_state, setup, optimizer), setup.variables)


def state_tree(state: TrainState) -> dict[str, Any]:
  """The arrays of a train state that a checkpoint stores."""
  return {
    'step': state.step,
    'params': state.params,
    'batch_stats': state.batch_stats,
    'opt_state': state.opt_state,
  }


def with_state_tree(state: TrainState, tree: dict[str, Any]) -> TrainState:
  """`state` with the arrays of a checkpoint's `state_tree`."""
  return state.replace(
    step=tree['step'],
    params=tree['params'],
    batch_stats=tree['batch_stats'],
    opt_state=tree['opt_state'],
  )


def params_sha256(params: Any) -> str:
  """A hash of the params' bytes in a fixed leaf order (sorted paths), to compare runs."""
  h = hashlib.sha256()
  for name, leaf in sorted(tree_util.named_leaves(jax.device_get(params))):
    arr = np.ascontiguousarray(np.asarray(leaf))
    h.update(f'{name}:{arr.dtype}:{arr.shape};'.encode())
    h.update(arr.tobytes())
  return h.hexdigest()
