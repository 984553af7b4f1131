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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import ec2t_jax
from ec2t_jax import masks as masks_lib
from ec2t_jax import tree_util
from ec2t_jax.training import schedule as schedule_lib
from ec2t_jax.training import spec as spec_lib
from ec2t_jax.training import stages as stages_lib
from ec2t_jax.training.variables import create_model, initial_variables, load_init_from

__all__ = [
  'Pass',
  'Setup',
  'TrainState',
  'abstract_train_state',
  'abstract_train_state_of',
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


# The default compression method (`config.method`); the valid ones are those registered in
# `ec2t_jax.methods` ('ec2t', and the baselines 'absmean' and 'twn', docs/baselines.md).
EC2T_METHOD = 'ec2t'


def _check_method_name(method: str) -> str:
  """`method`, refused with a `ValueError` unless `ec2t_jax.methods` registers it."""
  return ec2t_jax.methods.get(method, what='config.method').name


class TrainState(train_state.TrainState):
  """A Flax `TrainState` with BatchNorm statistics; EC2T lives in `opt_state`."""

  batch_stats: Any = None


class Pass(NamedTuple):
  """One pass of a run: the stages that train with one optimizer state.

  Attributes:
    kind: the kind of its first stage (`'fp'`, `'ec2t'` or `'ecp'`; a kind that
      opens a pass, `ec2t_jax.training.stages`).
    name: the name of its first stage.
    settings: the `config.fp` / `config.ec2t` fields it trains with (the
      stage's own settings over the config's).
    tx: its optimizer.
    num_steps: steps of all its stages.
    ternary_mask: bools shaped like the params, the leaves it ternarizes (None for fp).
    prune_mask: bools of the leaves it prunes (ECP), or None.
    fixed_mask: bools of the leaves it holds fixed, or None.
  """

  kind: str
  name: str
  settings: Any
  tx: optax.GradientTransformation
  num_steps: int
  ternary_mask: Any = None
  prune_mask: Any = None
  fixed_mask: Any = None

  @property
  def compresses(self) -> bool:
    """True if the pass trains a compressed network (its kind's `StageKind.compresses`)."""
    return stages_lib.get(self.kind).compresses


class Setup(NamedTuple):
  """What a run computes with, built once by `create_setup`.

  Attributes:
    model: the linen module.
    variables: `{'params', 'batch_stats'}` to start from (initial or pretrained).
    image_shape: one input image, `(height, width, channels)`.
    schedule: the run's `Schedule`.
    passes: one `Pass` per optimizer state (`Stage.pass_index`), in order.
    ternary_mask: bools shaped like the params: the leaves the finished run
      holds ternary (over all passes).
    prune_mask: bools of the leaves it holds pruned (ECP), or None.
  """

  model: Any
  variables: dict[str, Any]
  image_shape: tuple[int, ...]
  schedule: schedule_lib.Schedule
  passes: tuple[Pass, ...]
  ternary_mask: Any
  prune_mask: Any


def learning_rate_schedule(cfg: spec_lib.FpSettings, num_steps: int) -> optax.Schedule:
  """`cfg.learning_rate` held constant or cosine-decayed over `num_steps` (`cfg.schedule`)."""
  lr = cfg.learning_rate
  name = cfg.schedule or 'constant'
  if name == 'constant':
    return optax.constant_schedule(lr)
  if name == 'cosine':
    return optax.cosine_decay_schedule(lr, max(num_steps, 1))
  raise ValueError(f"unknown schedule {name!r}; valid: 'constant', 'cosine'")


def create_fp_optimizer(cfg: spec_lib.FpSettings, num_steps: int):
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
  cfg: spec_lib.CompressionSettings,
  model,
  params: Any,
  image_shape: tuple[int, ...],
  *,
  kind: str = stages_lib.EC2T,
) -> tuple[Any, Any]:
  """The ternary and prune masks of `config.ec2t` (or a stage's settings) for `params`.

  Without `cfg.ternary_pattern` the default selection finds the first and last
  layers in the order the model calls them (traced, so it does not depend on
  the params dict's key order). A kind that does not ternarize (`'ecp'`) selects
  no ternary leaf.
  """
  if not stages_lib.get(kind).ternarizes:
    ternary_mask = jax.tree.map(lambda _: False, params)
  elif cfg.ternary_pattern:
    ternary_mask = masks_lib.from_regex(params, cfg.ternary_pattern, cfg.ternary_exclude or None)
  else:
    order = masks_lib.call_order(
      model, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32), train=False
    )
    ternary_mask = masks_lib.default_ternary_mask(
      params,
      order=order,
      keep_first=cfg.keep_first,
      keep_last=cfg.keep_last,
      keep_pattern=cfg.keep_pattern or None,
    )
  prune_mask = None
  if cfg.prune_pattern:
    prune_mask = masks_lib.from_regex(params, cfg.prune_pattern)
    prune_mask = jax.tree.map(lambda p, t: p and not t, prune_mask, ternary_mask)
  return ternary_mask, prune_mask


def create_ec2t_optimizer(
  cfg: spec_lib.CompressionSettings,
  ternary_mask: Any,
  prune_mask: Any,
  freeze_at: int,
  fixed_mask: Any = None,
  *,
  method: str = EC2T_METHOD,
):
  """The optimizer of a compression pass, configured by `config.ec2t` (`cfg`).

  The optimizer of the registered method `method` (`ec2t_jax.methods`): for
  'ec2t', `ec2t_jax.ec2t` whose assignment freezes at update `freeze_at`; for
  the baselines ('absmean', 'twn'), Adam with `cfg.latent_learning_rate` on the
  latent weights of the ternary leaves and `ec2t_jax.default_fp_optimizer(
  cfg.learning_rate, cfg.weight_decay)` on the rest (they have no assignment to
  freeze, so `freeze_at` is ignored, and cannot prune). `fixed_mask` (or None)
  selects leaves held as they are (zero updates).

  Raises:
    ValueError: for an unknown `method`, or a `prune_mask` for a method that cannot prune.
  """
  return ec2t_jax.methods.get(_check_method_name(method)).optimizer(
    cfg, ternary_mask, prune_mask=prune_mask, fixed_mask=fixed_mask, freeze_at=freeze_at
  )


def create_setup(
  run: spec_lib.RunSpec,
  schedule: schedule_lib.Schedule,
  *,
  num_classes: int,
  image_shape: tuple[int, ...],
  load_pretrained: bool = True,
) -> Setup:
  """Builds the model, its variables, and every pass's masks and optimizer, validating them.

  Args:
    run: the parsed run (`ec2t_jax.training.spec.parse`).
    schedule: its schedule (the optimizers' step counts come from it).
    num_classes: classifier outputs.
    image_shape: one input image, `(height, width, channels)`.
    load_pretrained: read `init_from` or grow the pretrained base (False when a
      checkpoint will replace the variables anyway).

  Raises:
    ValueError: for a stage whose masks select nothing, overlap or select
      non-float leaves, an `init_from` that does not fit the model, or an
      unknown optimizer (one line, naming the stage).
  """
  model = create_model(run.model, num_classes)
  variables = initial_variables(model, image_shape, run.runtime.seed)
  if load_pretrained and run.model.grow_base_model:
    from ec2t_jax.training import pretrained  # Local: only runs that grow a base need it.

    variables = pretrained.grow_from_pretrained(
      run.model,
      seed=run.runtime.seed,
      network=model,
      variables=variables,
      image_shape=image_shape,
      num_classes=num_classes,
    )
  elif load_pretrained and run.model.init_from:
    variables = load_init_from(run.model, variables, num_classes=num_classes)
  passes = _create_passes(run, schedule, model, variables['params'], image_shape)
  ternary, prune = _final_masks(passes)
  if ternary is None:  # A full-precision-only run: the masks of config.ec2t describe it.
    ternary, prune = compression_masks(run.ec2t, model, variables['params'], image_shape)
  return Setup(
    model=model,
    variables=variables,
    image_shape=tuple(image_shape),
    schedule=schedule,
    passes=passes,
    ternary_mask=ternary,
    prune_mask=prune,
  )


def _final_masks(passes: tuple[Pass, ...]) -> tuple[Any, Any]:
  """The ternary and pruned leaves after all passes (the last pass to select a leaf wins)."""
  ternary = prune = None
  for p in passes:
    if p.ternary_mask is None:
      continue
    new_p = p.prune_mask
    if new_p is None:
      new_p = jax.tree.map(lambda _: False, p.ternary_mask)
    if ternary is None:
      ternary, prune = p.ternary_mask, new_p
      continue
    ternary = jax.tree.map(lambda t, nt, np_: (t and not np_) or nt, ternary, p.ternary_mask, new_p)
    prune = jax.tree.map(lambda q, nt, np_: (q and not nt) or np_, prune, p.ternary_mask, new_p)
  if prune is not None and not any(jax.tree.leaves(prune)):
    prune = None
  return ternary, prune


def _hold_fixed(tx: optax.GradientTransformation, fixed_mask: Any) -> optax.GradientTransformation:
  """`tx` on the leaves `fixed_mask` does not select; zero updates on those it does."""
  labels = jax.tree.map(lambda f: 'fixed' if f else 'train', fixed_mask)
  return optax.partition({'train': tx, 'fixed': optax.set_to_zero()}, labels)


def _some_names(params: Any, limit: int = 8) -> str:
  """The first `limit` leaf paths of `params`, for error messages."""
  names = [name for name, _ in tree_util.named_leaves(params)]
  return str(names[:limit]) + (' ...' if len(names) > limit else '')


def _fixed_by_pattern(settings, params) -> Any:
  """The leaves `settings.fixed_pattern` selects (all False without one)."""
  if not settings.fixed_pattern:
    return jax.tree.map(lambda _: False, params)
  fixed = masks_lib.from_regex(params, settings.fixed_pattern)
  if not any(jax.tree.leaves(fixed)):
    raise ValueError(
      f'fixed_pattern={settings.fixed_pattern!r} selects no leaf; leaves are {_some_names(params)}'
    )
  return fixed


def _create_pass(
  settings, kind, name, num_steps, freeze_at, compressed, model, params, image_shape, method
):
  """The `Pass` of one optimizer state; `compressed` marks leaves earlier passes compressed."""
  fixed = _fixed_by_pattern(settings, params)
  info = stages_lib.get(kind)
  if info.compresses:
    ec2t_jax.methods.check_pruning(
      method, prune_pattern=settings.prune_pattern, ecp_stage=not info.ternarizes
    )
  if not info.compresses:
    fixed = jax.tree.map(lambda f, c: f or c, fixed, compressed)
    tx = create_fp_optimizer(settings, num_steps)
    if any(jax.tree.leaves(fixed)):
      return Pass(kind, name, settings, _hold_fixed(tx, fixed), num_steps, fixed_mask=fixed)
    return Pass(kind, name, settings, tx, num_steps)
  if info.needs_prune_pattern and not settings.prune_pattern:
    raise ValueError(
      f'an {kind} stage needs prune_pattern, a regex of the leaves it prunes, e.g. '
      "'(se_reduce|se_expand|fc)/kernel$'"
    )
  ternary, prune = compression_masks(settings, model, params, image_shape, kind=kind)
  if prune is not None and not any(jax.tree.leaves(prune)):
    raise ValueError(
      f'prune_pattern={settings.prune_pattern!r} selects no leaf that is not ternary; leaves '
      f'are {_some_names(params)}'
    )
  # Validates the masks (selects something, no overlaps, floating leaves) before any step.
  ec2t_jax.param_labels(params, ternary, prune, fixed)
  selected = ternary if prune is None else jax.tree.map(lambda t, p: t or p, ternary, prune)
  # Leaves an earlier pass compressed stay as they are unless this pass selects them.
  fixed = jax.tree.map(lambda f, c, s: (f or c) and not s, fixed, compressed, selected)
  fixed = fixed if any(jax.tree.leaves(fixed)) else None
  tx = create_ec2t_optimizer(settings, ternary, prune, freeze_at, fixed, method=method)
  return Pass(kind, name, settings, tx, num_steps, ternary, prune, fixed)


def _create_passes(run, schedule, model, params, image_shape) -> tuple[Pass, ...]:
  """One `Pass` per optimizer state of `schedule`, with its masks, validated.

  Raises:
    ValueError: naming the stage (`config.stages.NAME: ...`) when it is configured.
  """
  specs, method = run.stages, run.method
  compressed = jax.tree.map(lambda _: False, params)
  passes = []
  for pass_index in range(schedule.num_passes):
    stages = schedule.pass_stages(pass_index)
    spec = specs[schedule.stages.index(stages[0])]
    settings = spec.settings
    try:
      p = _create_pass(
        settings,
        spec.kind,
        spec.name,
        sum(s.num_steps for s in stages),
        schedule.freeze_step(pass_index),
        compressed,
        model,
        params,
        image_shape,
        method,
      )
    except ValueError as e:
      if not run.named_stages:
        raise
      raise ValueError(f'config.stages.{spec.name}: {e}') from e
    passes.append(p)
    for mask in (p.ternary_mask, p.prune_mask):
      if mask is not None:
        compressed = jax.tree.map(lambda c, m: c or m, compressed, mask)
  return tuple(passes)


def create_train_state(setup: Setup, pass_index: int, variables: dict[str, Any]) -> TrainState:
  """A fresh `TrainState` of pass `pass_index` (its optimizer) from `variables`.

  A compression pass's state starts compressed: its params are the network of
  its initial assignment (`ec2t_jax.ternarize`; with `config.method='absmean'`
  the absmean ternarization of the incoming weights).
  """
  p = setup.passes[pass_index]
  state = TrainState.create(
    apply_fn=setup.model.apply,
    params=variables['params'],
    tx=p.tx,
    batch_stats=variables['batch_stats'],
  )
  if p.compresses:
    state = state.replace(params=ec2t_jax.ternarize(state.params, state.opt_state))
  return state


def abstract_train_state(setup: Setup, step: int) -> TrainState:
  """Shapes and dtypes of the train state a checkpoint of `step` holds (nothing computed)."""
  return abstract_train_state_of(setup, setup.schedule.pass_at(step))


def abstract_train_state_of(setup: Setup, pass_index: int) -> TrainState:
  """Shapes and dtypes of the train state of pass `pass_index` (nothing computed)."""
  return jax.eval_shape(functools.partial(create_train_state, setup, pass_index), setup.variables)


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
