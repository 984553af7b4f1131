"""Model zoo: Flax linen modules selected by name.

Every model takes NHWC images and is applied as
``model.apply(variables, x, train=..., rngs={'dropout': key}, mutable=[...])``;
BatchNorm statistics live in the ``'batch_stats'`` collection and dropout /
stochastic depth draw from the ``'dropout'`` rng. ``dtype`` sets the
computation dtype (e.g. ``jnp.bfloat16``) while parameters stay float32.

Parameter names (``conv1``, ``layer1_0/bn2``, ``blocks_3/se_reduce``, ...) are a
contract with the PyTorch converter; see each module's docstring.

A network builds its convolution and its BatchNorm once per call, as partials
that carry its dtypes and BatchNorm settings (`layers.with_dtypes`,
`layers.batch_norm`), and hands them to its blocks as their ``conv`` and
``norm`` attributes. `register` adds a model to the registry that `create`,
`input_shape` and `names` read; the built-in models are registered through it.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from ec2t_jax import models
  >>> model = models.create('resnet20', num_classes=10)
  >>> x = jnp.zeros((2, *models.input_shape('resnet20')))
  >>> variables = model.init(jax.random.key(0), x, train=False)
  >>> model.apply(variables, x, train=False).shape
  (2, 10)
"""

import functools
import importlib
import inspect
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from flax import linen as nn

from ec2t_jax.models import efficientnet
from ec2t_jax.models.efficientnet import VARIANTS as EFFICIENTNET_VARIANTS
from ec2t_jax.models.efficientnet import EfficientNet, MBConvBlock
from ec2t_jax.models.lenet import LeNet5
from ec2t_jax.models.micronet import MicroNet, MicroNetBlock, micronet_scaled
from ec2t_jax.models.resnet import STAGE_SIZES, BasicBlock, Bottleneck, ResNet
from ec2t_jax.models.resnet_cifar import CifarBasicBlock, CifarResNet
from ec2t_jax.models.vit import ViT

__all__ = [
  'BasicBlock',
  'Bottleneck',
  'CifarBasicBlock',
  'CifarResNet',
  'EfficientNet',
  'LeNet5',
  'MBConvBlock',
  'MicroNet',
  'MicroNetBlock',
  'ResNet',
  'ViT',
  'check_name',
  'create',
  'efficientnet',
  'input_shape',
  'micronet_scaled',
  'names',
  'register',
  'scaling',
]

# The published EC2T super-net (docs/algorithm.md §8): d=1.4, w=1.2, φ=3.5.
MICRONET_PHI35 = dict(d=1.4, w=1.2, phi=3.5)


class _Entry(NamedTuple):
  factory: Callable[..., nn.Module]
  input_shape: tuple[int, int, int] | None


_registry: dict[str, _Entry] = {}


def register(
  name: str,
  factory: Callable[..., nn.Module],
  *,
  input_shape: Sequence[int] | None = None,
  replace: bool = False,
) -> None:
  """Adds a model to the registry read by `create`, `input_shape` and `names`.

  The training program builds its network with
  ``create(config.model, num_classes=..., dtype=..., **config.model_kwargs)``,
  so a registered model is trainable by name.

  Args:
    name: the model's name.
    factory: called as ``factory(num_classes=..., **kwargs)`` by `create`; it
      returns an unbound linen module that is applied as
      ``model.apply(variables, x, train=...)`` to NHWC images.
    input_shape: the default input ``(height, width, channels)``; None if the
      model has none, and then `input_shape` refuses the name.
    replace: replace a model already registered under ``name`` (the keyword of
      every registry of this package: models, datasets, compression methods).

  Raises:
    ValueError: if ``name`` is already registered (and ``replace`` is False),
      or ``input_shape`` is not three positive integers.
    TypeError: if ``factory`` is not callable or ``input_shape`` holds a non-integer.

  Example:
    >>> import functools, jax, jax.numpy as jnp
    >>> from ec2t_jax import models
    >>> models.register(
    ...   'resnet8', functools.partial(models.CifarResNet, depth=8), input_shape=(32, 32, 3)
    ... )
    >>> model = models.create('resnet8', num_classes=10)
    >>> x = jnp.zeros((1, *models.input_shape('resnet8')))
    >>> model.apply(model.init(jax.random.key(0), x), x).shape
    (1, 10)
  """
  if name in _registry and not replace:
    raise ValueError(f"model '{name}' is already registered; pass replace=True to replace it")
  if not callable(factory):
    raise TypeError(f'factory must be callable, got {type(factory).__name__}')
  shape = None
  if input_shape is not None:
    shape = tuple(operator.index(d) for d in input_shape)
    if len(shape) != 3 or min(shape) <= 0:
      raise ValueError(f'input_shape must be positive (height, width, channels), got {shape}')
  _registry[name] = _Entry(factory, shape)


def names() -> list[str]:
  """Lists the registered model names, in registration order.

  Returns:
    The names accepted by `create` and `input_shape`.
  """
  return list(_registry)


def _lookup(name: str) -> _Entry:
  if name not in _registry:
    raise ValueError(
      f"unknown model '{name}'; valid names: {', '.join(names())}, or "
      "'package.module:factory' for your own"
    )
  return _registry[name]


def _import_factory(name: str) -> Callable[..., nn.Module]:
  """The callable named by `'package.module:attribute'`."""
  module_name, _, attr = name.partition(':')
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(
      f'model {name!r}: cannot import {module_name!r} ({e}); is it on PYTHONPATH?'
    ) from e
  factory = module
  for part in attr.split('.'):
    factory = getattr(factory, part, None)
  if not callable(factory):
    raise ValueError(f'model {name!r}: {module_name!r} has no callable {attr!r}')
  return factory


def check_name(name: str) -> None:
  """Raises a ValueError unless `create` can build `name` (a registered name or an import)."""
  if ':' in name:
    _import_factory(name)
  else:
    _lookup(name)


def create(name: str, *, num_classes: int, **kwargs: Any) -> nn.Module:
  """Creates a registered model, or your own one named `'package.module:factory'`.

  A `'package.module:factory'` names any importable callable that returns a
  linen module (a class or a function), applied as
  `model.apply(variables, images, train=...)` to NHWC images. It is called with
  `num_classes` and `kwargs`; a `dtype` it does not accept is left out.

  Args:
    name: one of `names()`, e.g. ``'resnet20'`` or ``'efficientnet_b1'``, or
      ``'mypackage.nets:MyNet'``.
    num_classes: number of output logits.
    **kwargs: module attributes, e.g. ``dtype=jnp.bfloat16``, ``axis_name='batch'``,
      ``bn_momentum``, ``depth_mult``/``width_mult`` for ``'micronet'``,
      ``same_padding`` for EfficientNets, ``patch_size``/``width``/``depth`` for
      ``'vit_tiny'``.

  Returns:
    The unbound linen module.

  Raises:
    ValueError: if ``name`` is not registered (the message lists the valid
      names) or cannot be imported.

  Example:
    >>> model = create('micronet', num_classes=100, depth_mult=2.0)
  """
  if ':' not in name:
    return _lookup(name).factory(num_classes=num_classes, **kwargs)
  factory = _import_factory(name)
  if 'dtype' in kwargs:
    try:
      parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
      parameters = {}
    if 'dtype' not in parameters and not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
      kwargs = {k: v for k, v in kwargs.items() if k != 'dtype'}
  return factory(num_classes=num_classes, **kwargs)


def input_shape(name: str) -> tuple[int, int, int]:
  """The default input shape ``(H, W, C)`` of a registered model.

  28x28x1 for LeNet-5 and ViT-tiny, 32x32x3 for the CIFAR nets, 224x224x3 for the ImageNet
  ResNets, and the variant's resolution for EfficientNets (e.g. 240 for B1).

  Args:
    name: one of `names()`.

  Returns:
    ``(height, width, channels)``.

  Raises:
    ValueError: if ``name`` is not registered, or was registered without an
      input shape.
  """
  shape = _lookup(name).input_shape
  if shape is None:
    raise ValueError(f"model '{name}' was registered without an input shape")
  return shape


def __getattr__(name: str) -> Any:
  # `scaling` (the candidate table and its command line) imports this package, so
  # the package imports it only on first access: `python -m ec2t_jax.models.scaling`
  # then finds it not yet imported.
  if name == 'scaling':
    return importlib.import_module('ec2t_jax.models.scaling')
  raise AttributeError(f"module '{__name__}' has no attribute '{name}'")


def _register_builtins() -> None:
  mnist, cifar, imagenet = (28, 28, 1), (32, 32, 3), (224, 224, 3)
  register('lenet5', LeNet5, input_shape=mnist)
  register('vit_tiny', ViT, input_shape=mnist)  # Any H, W divisible by its patch_size (7).
  for depth in (20, 32, 44, 56, 110):
    register(f'resnet{depth}', functools.partial(CifarResNet, depth=depth), input_shape=cifar)
  register('micronet', MicroNet, input_shape=cifar)
  # Same architecture; two names for the paper's C10-/C100-MicroNet.
  for name in ('micronet_c10', 'micronet_c100'):
    register(name, functools.partial(micronet_scaled, **MICRONET_PHI35), input_shape=cifar)
  for depth, (block, sizes) in STAGE_SIZES.items():
    resnet = functools.partial(ResNet, block=block, stage_sizes=sizes)
    register(f'resnet{depth}', resnet, input_shape=imagenet)
  for variant, spec in EFFICIENTNET_VARIANTS.items():
    register(
      f'efficientnet_{variant}',
      functools.partial(efficientnet.from_variant, variant),
      input_shape=(spec.resolution, spec.resolution, 3),
    )


_register_builtins()
