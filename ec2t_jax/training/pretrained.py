"""Grows a pretrained base network into the run's super-network (EC2T's first step).

EC2T (Marban et al., CVPR-W 2020, arXiv 2004.01077, §3.4; docs/algorithm.md §8)
compresses a compound-scaled super-network: a trained base network scaled in
depth by ``d**φ`` and in width by ``w**φ`` (and in resolution by ``r**φ``). With
``config.grow.base_model`` set, a run starts from the base's trained variables
(``config.init_from``) grown into ``config.model`` by `ec2t_jax.models.grow.grow`
(Net2Net-style, function-preserving) instead of reading ``init_from`` as the
variables of ``config.model`` itself. `grow_from_pretrained` checks that the
grown network's eval-mode logits equal the base's before any training step;
`validate_grow` checks the growth without compiling anything. Both read the
run's `ec2t_jax.training.spec.ModelSpec` (``spec.parse(config).model``), not the
config; its ``grow_*`` fields are these config fields::

    config.grow.base_model         # the base's model name as config.model takes it; '' = no growth
    config.grow.base_model_kwargs  # the base's attributes (as config.model_kwargs)
    config.grow.split              # 'equal' (Net2Net) or 'random' shares of replicated channels
    config.grow.seed               # new blocks' kernels and channel maps; 0 = config.seed

How ``(d, w, φ)`` map to the target, for MicroNet: a base ``'micronet'`` with
``depth_mult=a, width_mult=b`` (the paper's base is ``a = b = 1``, the 44-layer
MicroNet) grows into ``'micronet'`` with ``depth_mult = a·d**φ`` and
``width_mult = b·w**φ`` (`compound_kwargs`): ``ceil(7·depth_mult)`` blocks per
stage and ``round_filters(16/32/64, width_mult)`` channels. The registered
``'micronet_c10'`` / ``'micronet_c100'`` are the published super-net
(``d=1.4, w=1.2, φ=3.5``: 23 blocks per stage, widths 32/64/120), the same
network as ``model='micronet'`` with ``model_kwargs=compound_kwargs(1.4, 1.2, 3.5)``.
The paper's run, on the command line::

    --config.model=micronet_c100 --config.grow.base_model=micronet \\
      --config.init_from=/path/to/trained_micronet

The resolution ``r**φ`` is not part of the growth: CIFAR stays 32x32 (the
paper's ``r = 1``), and the parameter shapes of the growable families do not
depend on the input size (the run's image shape is the dataset's, or
``config.image_size``). CIFAR ResNets grow in depth (``resnet20`` → ``resnet56``),
ImageNet ResNets in blocks per stage (``resnet18`` → ``resnet34``);
EfficientNets and LeNet-5 cannot be grown.

Example (small multipliers; a random base stands in for a trained one):

  >>> import os, tempfile
  >>> import ml_collections
  >>> from ec2t_jax import models
  >>> from ec2t_jax.configs import default
  >>> from ec2t_jax.training import checkpoint, pretrained, spec, variables
  >>> base_kwargs = dict(depth_mult=0.15, width_mult=0.5)
  >>> base = models.create('micronet', num_classes=10, **base_kwargs)
  >>> base.blocks_per_stage, base.widths
  (2, (8, 16, 32))
  >>> config = default.get_config()
  >>> config.init_from = os.path.join(tempfile.mkdtemp(), 'base')
  >>> checkpoint.save_variables(config.init_from, variables.initial_variables(base, (32, 32, 3), 0))
  >>> config.grow.base_model = 'micronet'
  >>> config.grow.base_model_kwargs = ml_collections.ConfigDict(base_kwargs)
  >>> config.model = 'micronet'
  >>> config.model_kwargs = ml_collections.ConfigDict(
  ...   pretrained.compound_kwargs(1.4, 1.2, 2.0, **base_kwargs)
  ... )
  >>> model = spec.model_spec(config)  # What `spec.parse(config).model` holds.
  >>> pretrained.validate_grow(model, num_classes=10, seed=0)
  >>> network = variables.create_model(model, num_classes=10)
  >>> network.blocks_per_stage, network.widths
  (3, (16, 24, 48))
  >>> grown = pretrained.grow_from_pretrained(
  ...   model,
  ...   seed=0,
  ...   network=network,
  ...   variables=variables.initial_variables(network, (32, 32, 3), 0),
  ...   image_shape=(32, 32, 3),
  ...   num_classes=10,
  ... )
  >>> grown['params']['layer3_2']['conv2']['kernel'].shape
  (3, 3, 48, 48)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ec2t_jax import models, tree_util
from ec2t_jax.models import grow as grow_lib
from ec2t_jax.training import variables as variables_lib
from ec2t_jax.training.spec import ModelSpec

__all__ = [
  'NUM_CHECK_IMAGES',
  'compound_kwargs',
  'grow_from_pretrained',
  'validate_grow',
]

# Images of the logits check: standard-normal, from a fixed numpy seed.
NUM_CHECK_IMAGES = 4
_CHECK_SEED = 0
# The grown logits may differ from the base's by ATOL_REL·max|base logit| + ATOL_ABS.
_ATOL_REL = 1e-4
_ATOL_ABS = 1e-5
_SPLITS = ('equal', 'random')
# Parameter shapes of the growable families do not depend on the input size (as in grow).
_SHAPE_PROBE = (32, 32, 3)


def compound_kwargs(
  d: float,
  w: float,
  phi: float,
  *,
  depth_mult: float = 1.0,
  width_mult: float = 1.0,
) -> dict[str, float]:
  """MicroNet attributes of a base (``depth_mult``, ``width_mult``) compound-scaled by (d, w, φ).

  The target of a growth is the base scaled by ``d**phi`` in depth and
  ``w**phi`` in width; use the result as ``config.model_kwargs`` of
  ``config.model='micronet'`` and the base's attributes as
  ``config.grow.base_model_kwargs``.

  Args:
    d: depth coefficient at φ = 1 (>= 1: growth never removes blocks).
    w: width coefficient at φ = 1 (>= 1).
    phi: compound coefficient (>= 0).
    depth_mult: the base's ``depth_mult`` (the paper's base: 1).
    width_mult: the base's ``width_mult`` (the paper's base: 1).

  Returns:
    ``{'depth_mult': depth_mult·d**phi, 'width_mult': width_mult·w**phi}``.

  Raises:
    ValueError: if ``d`` or ``w`` is below 1, ``phi`` is negative, or a base
      multiplier is not positive.

  Example:
    >>> kwargs = compound_kwargs(1.4, 1.2, 3.5)  # The published EC2T super-net.
    >>> models.create('micronet', num_classes=100, **kwargs).widths
    (32, 64, 120)
  """
  if d < 1 or w < 1 or phi < 0:
    raise ValueError(
      f'compound_kwargs needs d >= 1, w >= 1 and phi >= 0 (growth never shrinks the base), '
      f'got d={d}, w={w}, phi={phi}'
    )
  if depth_mult <= 0 or width_mult <= 0:
    raise ValueError(
      f'the base multipliers must be > 0, got depth_mult={depth_mult}, width_mult={width_mult}'
    )
  return {'depth_mult': depth_mult * d**phi, 'width_mult': width_mult * w**phi}


def validate_grow(model: ModelSpec, *, num_classes: int, seed: int) -> None:
  """Checks the growth of ``model`` (its ``grow_*`` fields) without compiling anything.

  Nothing to check when ``model.grow_base_model`` is empty. Otherwise it builds
  the base's and ``model``'s modules, traces the base's shapes
  (``jax.eval_shape``) and runs `grow` on zeros of those shapes, so every error
  growth would raise comes now, naming both models. The files of
  ``model.init_from`` are not read.

  Args:
    model: the run's network (``spec.parse(config).model``, or
      ``spec.model_spec(config)``).
    num_classes: classifier outputs of both modules (only shapes are traced).
    seed: the run's seed (``config.seed``): the growth's rng when
      ``model.grow_seed`` (``config.grow.seed``) is 0.

  Raises:
    ValueError: one line naming the ``config.grow.*`` field, for a base model
      without ``config.init_from``, an unknown base model name, an unknown
      ``config.grow.split``, a target (or base) of a family `grow` does not
      support or of another family than the base, or a target with fewer
      blocks or channels than the base.

  Example:
    >>> from ec2t_jax.configs import default
    >>> from ec2t_jax.training import spec
    >>> config = default.get_config()
    >>> config.model = 'resnet56'
    >>> config.grow.base_model = 'resnet20'
    >>> config.init_from = '/path/to/trained_resnet20'
    >>> validate_grow(spec.model_spec(config), num_classes=10, seed=0)
  """
  if not model.grow_base_model:
    return
  _check_fields(model)
  base_model = _base_model(model)
  base = variables_lib.create_model(base_model, num_classes)
  target = variables_lib.create_model(model, num_classes)
  _check_families(model, base, target)
  zeros = jax.tree.map(
    lambda s: np.zeros(s.shape, s.dtype), _abstract_variables(base, _SHAPE_PROBE)
  )
  _grow(model, seed, zeros, base, target)


def grow_from_pretrained(
  model: ModelSpec,
  *,
  seed: int,
  network: Any,
  variables: Mapping[str, Any],
  image_shape: tuple[int, ...],
  num_classes: int,
) -> dict[str, Any]:
  """The trained base network of ``model``'s growth grown into ``network``, checked by its logits.

  Builds ``model.grow_base_model`` (with ``model.grow_base_model_kwargs``,
  ``num_classes``, and bfloat16 compute if ``model.half_precision``, as
  `ec2t_jax.training.variables.create_model` builds ``model``), reads
  ``model.init_from`` as its variables (`ec2t_jax.training.variables.load_init_from`),
  grows them into ``network`` (`ec2t_jax.models.grow.grow`, rng
  ``model.grow_seed`` or else ``seed``, split ``model.grow_split``), and
  compares both networks' eval-mode logits in float32 on `NUM_CHECK_IMAGES`
  fixed standard-normal images of ``image_shape``.

  Args:
    model: the run's network with ``grow_base_model`` set
      (``spec.parse(config).model``; its fields are ``config.model``,
      ``config.init_from``, ``config.grow.*``, ...).
    seed: the run's seed (``config.seed``): the growth's rng when
      ``model.grow_seed`` (``config.grow.seed``) is 0.
    network: the run's super-network, the linen module of ``model``.
    variables: its fresh ``{'params', 'batch_stats'}``, the template of the
      result's structure, shapes and dtypes.
    image_shape: one input image, ``(height, width, channels)``.
    num_classes: classifier outputs of both networks.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` of ``network``, with the dtypes of
    ``variables``.

  Raises:
    ValueError: one line, for the errors of `validate_grow`, an ``init_from``
      that does not fit the base model, or grown logits that differ from the
      base's by more than ``1e-4·max|base logit| + 1e-5`` (naming the largest
      difference).
    FileNotFoundError: if ``model.init_from`` does not exist.

  Example:
    >>> network = variables_lib.create_model(model, num_classes=10)
    >>> variables = grow_from_pretrained(
    ...   model,
    ...   seed=0,
    ...   network=network,
    ...   variables=variables_lib.initial_variables(network, (32, 32, 3), 0),
    ...   image_shape=(32, 32, 3),
    ...   num_classes=10,
    ... )
  """
  if not model.grow_base_model:
    raise ValueError(
      f'grow_from_pretrained needs config.grow.base_model, got {model.grow_base_model!r}; '
      "set it to the pretrained base's model name (e.g. 'micronet'), or read config.init_from "
      'with variables.load_init_from'
    )
  _check_fields(model)
  base_model = _base_model(model)
  base = variables_lib.create_model(base_model, num_classes)
  _check_families(model, base, network)
  try:
    base_variables = variables_lib.load_init_from(
      base_model,
      _abstract_variables(base, tuple(image_shape)),
      num_classes=num_classes,
    )
  except ValueError as e:
    raise ValueError(f'{e} (read as the base network {_label(model, base, base=True)})') from e
  grown = _grow(model, seed, base_variables, base, network)

  diff, tol = _logit_difference(base, base_variables, network, grown, tuple(image_shape))
  logging.info(
    'config.grow: base %s, %d params; target %s, %d params; max |logit difference| %.3g '
    '(tolerance %.3g) on %d images',
    _label(model, base, base=True),
    _num_params(base_variables),
    _label(model, network, base=False),
    _num_params(grown),
    diff,
    tol,
    NUM_CHECK_IMAGES,
  )
  if not diff <= tol:  # Also catches NaN.
    raise ValueError(
      f'the grown {_label(model, network, base=False)} does not compute the function of the base '
      f'{_label(model, base, base=True)}: max |logit difference| {diff:.3g} on '
      f'{NUM_CHECK_IMAGES} fixed images, valid is <= {tol:.3g} '
      f'({_ATOL_REL:g}·max|base logit| + {_ATOL_ABS:g})'
    )
  return _like(grown, variables)


def _check_fields(model: ModelSpec) -> None:
  """The checks of the ``grow_*`` fields (``config.grow``) that need no module."""
  base = model.grow_base_model
  if not isinstance(base, str):
    raise ValueError(f'config.grow.base_model must be a model name (str), got {base!r}')
  if not model.init_from:
    raise ValueError(
      f'config.grow.base_model={base!r} grows a pretrained network but config.init_from is '
      "empty: set it to the base's trained variables (an orbax directory written by "
      "checkpoint.save_variables, or a .pt/.pth file), or config.grow.base_model='' to not grow"
    )
  try:
    models.check_name(base)
  except ValueError as e:
    raise ValueError(f'config.grow.base_model={base!r}: {e}') from e
  kwargs = model.grow_base_model_kwargs
  if kwargs is not None and not (isinstance(kwargs, Mapping) or hasattr(kwargs, 'to_dict')):
    raise ValueError(
      f'config.grow.base_model_kwargs must be a dict of the base model attributes, got {kwargs!r}'
    )
  split = model.grow_split or 'equal'
  if split not in _SPLITS:
    raise ValueError(
      f'config.grow.split={split!r} is not a split; valid: {", ".join(map(repr, _SPLITS))}'
    )


def _base_kwargs(model: ModelSpec) -> dict[str, Any]:
  """The base's attributes as plain dicts (a ConfigDict's ``to_dict``)."""
  kwargs = model.grow_base_model_kwargs or {}
  if hasattr(kwargs, 'to_dict'):  # An ml_collections.ConfigDict.
    return kwargs.to_dict()
  return {k: (v.to_dict() if hasattr(v, 'to_dict') else v) for k, v in kwargs.items()}


def _base_model(model: ModelSpec) -> ModelSpec:
  """The base network's spec: ``model`` with the base's name and attributes, not grown itself.

  It keeps ``half_precision`` and ``init_from`` (the base's trained variables).
  """
  return dataclasses.replace(
    model,
    name=model.grow_base_model,
    kwargs=dict(model.grow_base_model_kwargs or {}),
    grow_base_model='',
    grow_base_model_kwargs={},
  )


def _describe(module: Any) -> str:
  if isinstance(module, models.MicroNet):
    return f'{module.blocks_per_stage} blocks per stage, widths {module.widths}'
  if isinstance(module, models.CifarResNet):
    return f'depth {module.depth}'
  if isinstance(module, models.ResNet):
    return f'{module.block} blocks {tuple(module.stage_sizes)}'
  return type(module).__name__


def _label(model: ModelSpec, module: Any, *, base: bool) -> str:
  """``config.model='micronet' {'depth_mult': 2.0} (14 blocks per stage, ...)``."""
  if base:
    field, name, kwargs = 'config.grow.base_model', model.grow_base_model, _base_kwargs(model)
  else:
    field, name, kwargs = 'config.model', model.name, dict(model.kwargs or {})
  kwargs_text = f' {kwargs}' if kwargs else ''
  return f'{field}={name!r}{kwargs_text} ({_describe(module)})'


def _growable_names() -> list[str]:
  """Registered models `grow` supports (building a module is cheap: no parameters)."""
  names = []
  for name in models.names():
    try:
      module = models.create(name, num_classes=10)
    except Exception:  # noqa: BLE001 - a user's registered factory may refuse the defaults.
      continue
    if type(module) in grow_lib.SUPPORTED:
      names.append(name)
  return names


def _check_families(model: ModelSpec, base: Any, target: Any) -> None:
  families = ', '.join(c.__name__ for c in grow_lib.SUPPORTED)
  if type(target) not in grow_lib.SUPPORTED:
    raise ValueError(
      f'config.model={model.name!r} builds {type(target).__name__}, which config.grow cannot '
      f'grow into; valid: a model of {families}, e.g. {", ".join(_growable_names())}'
    )
  if type(base) is not type(target):
    same = [n for n in _growable_names() if type(models.create(n, num_classes=10)) is type(target)]
    raise ValueError(
      f'config.grow.base_model={model.grow_base_model!r} builds {type(base).__name__} but '
      f'config.model={model.name!r} builds {type(target).__name__}: grow needs one family; '
      f'valid base models: {", ".join(same)}'
    )


def _abstract_variables(module: Any, image_shape: tuple[int, ...]) -> dict[str, Any]:
  """Shapes and dtypes of ``{'params', 'batch_stats'}`` (traced, not compiled)."""

  def init():
    rng = jax.random.key(0)
    return module.init({'params': rng, 'dropout': rng}, jnp.zeros((1, *image_shape)), train=False)

  shapes = jax.eval_shape(init)
  return {'params': shapes['params'], 'batch_stats': shapes.get('batch_stats', {})}


def _grow(model: ModelSpec, seed: int, base_variables, base, target) -> dict[str, Any]:
  """`grow_lib.grow` with rng ``model.grow_seed`` or else ``seed``; its errors name both models."""
  try:
    return grow_lib.grow(
      base_variables,
      base,
      target,
      rng=model.grow_seed or seed,
      split=model.grow_split or 'equal',
    )
  except ValueError as e:
    raise ValueError(
      f'cannot grow {_label(model, base, base=True)} into '
      f"{_label(model, target, base=False)}: {e}; the target needs at least the base's "
      'blocks per stage and channels, and the same other attributes'
    ) from e


def _float32(module: Any) -> Any:
  return module.clone(dtype=jnp.float32) if hasattr(module, 'dtype') else module


def _eval_logits(module: Any, variables: Any, x: np.ndarray) -> np.ndarray:
  module = _float32(module)
  apply = jax.jit(lambda v, x: module.apply(v, x, train=False))
  return np.asarray(apply(variables, x), np.float32)


def _logit_difference(base, base_variables, target, grown, image_shape) -> tuple[float, float]:
  """Max |grown - base| eval-mode logit difference in float32, and its tolerance."""
  rng = np.random.default_rng(_CHECK_SEED)
  x = rng.standard_normal((NUM_CHECK_IMAGES, *image_shape), dtype=np.float32)
  want = _eval_logits(base, base_variables, x)
  got = _eval_logits(target, grown, x)
  tol = _ATOL_REL * float(np.max(np.abs(want))) + _ATOL_ABS
  return float(np.max(np.abs(got - want))), tol


def _num_params(variables: Mapping[str, Any]) -> int:
  return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(variables['params']))


def _like(grown: Mapping[str, Any], template: Mapping[str, Any]) -> dict[str, Any]:
  """``grown`` cast to the dtypes of ``template``, after checking they have the same leaves."""
  template = {'params': template['params'], 'batch_stats': template.get('batch_stats') or {}}
  grown = {'params': grown['params'], 'batch_stats': grown.get('batch_stats') or {}}
  want = {n: (np.shape(x), x.dtype) for n, x in tree_util.named_leaves(template)}
  got = {n: np.shape(x) for n, x in tree_util.named_leaves(grown)}
  bad = sorted(set(want) ^ set(got)) + sorted(
    n for n in set(want) & set(got) if want[n][0] != got[n]
  )
  if bad:
    raise ValueError(
      f'the grown variables do not fit the variables of config.model ({len(bad)} leaves differ, '
      f'e.g. {bad[:4]}); valid: the leaves and shapes of the freshly initialised model'
    )
  flat = dict(tree_util.named_leaves(grown))
  return jax.tree_util.tree_map_with_path(
    lambda path, t: jnp.asarray(flat[tree_util.path_str(path)], t.dtype), template
  )
