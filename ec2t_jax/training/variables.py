"""The run's network and the variables it starts from.

`create_model` builds the linen module of `config.model`, `initial_variables`
initializes it, and `load_init_from` reads pretrained variables (an orbax
directory or a PyTorch `.pt`/`.pth` state_dict) checked against the model's.
Both the train-state set-up (`ec2t_jax.training.setup`) and the growth of a
pretrained base (`ec2t_jax.training.pretrained`) use them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ec2t_jax import models, tree_util
from ec2t_jax.training import checkpoint as checkpoint_lib
from ec2t_jax.training.spec import ModelSpec

__all__ = [
  'create_model',
  'initial_shapes',
  'initial_variables',
  'load_init_from',
  'load_variables',
  'model_output_problems',
]


def create_model(model: ModelSpec, num_classes: int):
  """The linen module of `model.name` (registered, or `'package.module:factory'`).

  Built with `num_classes`, the entries of `model.kwargs` (`config.model_kwargs`),
  and bfloat16 compute (`dtype`) if `model.half_precision`.
  """
  dtype = jnp.bfloat16 if model.half_precision else jnp.float32
  return models.create(model.name, num_classes=num_classes, dtype=dtype, **dict(model.kwargs))


def initial_variables(model, image_shape: tuple[int, ...], seed: int) -> dict[str, Any]:
  """`model.init` on a dummy batch: `{'params': ..., 'batch_stats': ...}` (float32)."""
  rng = jax.random.key(seed)

  @jax.jit
  def init(rng):
    return model.init({'params': rng, 'dropout': rng}, jnp.zeros((1, *image_shape)), train=False)

  variables = dict(init(rng))
  variables.setdefault('batch_stats', {})
  return {'params': variables['params'], 'batch_stats': variables['batch_stats']}


def initial_shapes(model, image_shape: tuple[int, ...]) -> dict[str, Any]:
  """Shapes and dtypes of `initial_variables(model, image_shape, 0)` (nothing computed)."""
  return jax.eval_shape(lambda: initial_variables(model, image_shape, 0))


def _check_variables(loaded: Any, expected: Any, source: str, what: str) -> None:
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
      f'{what}={source!r} does not fit the model ({len(problems)} problems): '
      + '; '.join(problems[:6])
    )


def load_init_from(
  model: ModelSpec, expected: dict[str, Any], *, num_classes: int
) -> dict[str, Any]:
  """Pretrained variables from `model.init_from` (orbax directory or PyTorch file).

  Args:
    model: the run's network (`init_from`, `name`, `kwargs`).
    expected: the model's fresh variables (or their shapes): the structure,
      shapes and dtypes the loaded ones must have.
    num_classes: the classifier's outputs, as the run resolved them (the
      dataset's when `config.num_classes` is 0).

  Raises:
    ValueError: naming `config.init_from` for a file or directory that cannot
      be read, holds no `params`, or does not fit the model.
    FileNotFoundError: if it does not exist.
    ImportError: for a PyTorch file without torch installed.
  """
  return load_variables(model.init_from, model, expected, num_classes=num_classes)


def load_variables(
  source: str,
  model: ModelSpec,
  expected: dict[str, Any],
  *,
  num_classes: int,
  what: str = 'config.init_from',
) -> dict[str, Any]:
  """Variables of `model` from `source` (an orbax directory or a PyTorch file), checked.

  As `load_init_from`, for any source; errors name it as `what`.
  """
  try:
    if source.endswith(('.pt', '.pth')):
      from ec2t_jax.models import pytorch  # Local: torch is optional.

      loaded = pytorch.from_pytorch(
        source, model.name, num_classes=num_classes or None, **dict(model.kwargs)
      )
    else:
      loaded = checkpoint_lib.load_variables(source)
  except (ValueError, TypeError) as e:
    raise ValueError(f'{what}={source!r}: {e}') from e
  if not isinstance(loaded, Mapping) or not isinstance(loaded.get('params'), Mapping):
    raise ValueError(
      f"{what}={source!r} holds no 'params' collection; it must be a directory "
      'written by ec2t_jax.training.checkpoint.save_variables, or a .pt/.pth state_dict'
    )
  loaded = {'params': loaded['params'], 'batch_stats': loaded.get('batch_stats') or {}}
  _check_variables(loaded, expected, source, what)
  return jax.tree.map(lambda x, e: jnp.asarray(x, e.dtype), loaded, expected)


def model_output_problems(spec: ModelSpec, num_classes: int, image_shape) -> list[str]:
  """What keeps `spec`'s model from training on these images: one message per problem.

  The model must build, run on a batch of one image of `image_shape`
  (traced with `jax.eval_shape`, nothing computed), return `(batch,
  num_classes)` logits and have floating-point params.
  """
  try:
    model = create_model(spec, num_classes)
  except (ValueError, TypeError, FileNotFoundError) as e:
    return [str(e)]
  if not hasattr(model, 'init'):
    return [
      f'config.model={spec.name!r} built a {type(model).__name__}, not a flax.linen '
      'Module: its factory must return a Module (models.register(name, factory))'
    ]

  def output():
    x = jnp.zeros((1, *image_shape), jnp.float32)
    rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(0)}
    return model.init_with_output(rngs, x, train=False)

  try:
    logits, variables = jax.eval_shape(output)
  except Exception as e:  # noqa: BLE001  (any failure to trace the model on this input)
    detail = ' '.join(str(e).split())[:300]
    return [
      f'config.model={spec.name!r} cannot run on images of shape {tuple(image_shape)} '
      f'({type(e).__name__}: {detail}); check config.model_kwargs, config.image_size or the '
      'dataset'
    ]
  problems = []
  shape = getattr(logits, 'shape', None)
  if shape is None or len(shape) != 2 or shape[-1] != num_classes:
    problems.append(
      f'config.model={spec.name!r} returns outputs of shape {shape} for a batch of 1, '
      f'but the run has {num_classes} classes: the model must return (batch, {num_classes}) '
      'logits'
    )
  bad = [
    '/'.join(str(getattr(k, 'key', k)) for k in path)
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables.get('params', {}))
    if not jnp.issubdtype(leaf.dtype, jnp.floating)
  ]
  if bad:
    problems.append(
      f'config.model={spec.name!r} has params that are not floating point ({", ".join(bad[:3])}'
      f'); gradients need float params: keep integer state in another collection than '
      "'params'"
    )
  return problems
