"""Model zoo: Flax linen modules selected by name.

Every model takes NHWC images and is applied as
``model.apply(variables, x, train=..., rngs={'dropout': key}, mutable=[...])``;
BatchNorm statistics live in the ``'batch_stats'`` collection and dropout /
stochastic depth draw from the ``'dropout'`` rng. ``dtype`` sets the
computation dtype (e.g. ``jnp.bfloat16``) while parameters stay float32.

Parameter names (``conv1``, ``layer1_0/bn2``, ``blocks_3/se_reduce``, ...) are a
contract with the PyTorch converter; see each module's docstring.

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
from collections.abc import Callable
from typing import Any

from flax import linen as nn

from ec2t_jax.models import efficientnet, scaling
from ec2t_jax.models.efficientnet import VARIANTS as EFFICIENTNET_VARIANTS
from ec2t_jax.models.efficientnet import EfficientNet, MBConvBlock
from ec2t_jax.models.lenet import LeNet5
from ec2t_jax.models.micronet import MicroNet, MicroNetBlock, micronet_scaled
from ec2t_jax.models.resnet import STAGE_SIZES, BasicBlock, Bottleneck, ResNet
from ec2t_jax.models.resnet_cifar import CifarBasicBlock, CifarResNet

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
  'create',
  'efficientnet',
  'input_shape',
  'micronet_scaled',
  'names',
  'scaling',
]

# The published EC2T super-net (docs/algorithm.md §8): d=1.4, w=1.2, φ=3.5.
MICRONET_PHI35 = dict(d=1.4, w=1.2, phi=3.5)

_MNIST = (28, 28, 1)
_CIFAR = (32, 32, 3)
_IMAGENET = (224, 224, 3)

# name -> (factory(num_classes=..., **kwargs) -> nn.Module, default (H, W, C)).
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], tuple[int, int, int]]] = {
  'lenet5': (LeNet5, _MNIST),
  **{
    f'resnet{depth}': (functools.partial(CifarResNet, depth=depth), _CIFAR)
    for depth in (20, 32, 44, 56, 110)
  },
  'micronet': (MicroNet, _CIFAR),
  # Same architecture; two names for the paper's C10-/C100-MicroNet.
  'micronet_c10': (functools.partial(micronet_scaled, **MICRONET_PHI35), _CIFAR),
  'micronet_c100': (functools.partial(micronet_scaled, **MICRONET_PHI35), _CIFAR),
  **{
    f'resnet{depth}': (
      functools.partial(ResNet, block=block, stage_sizes=sizes),
      _IMAGENET,
    )
    for depth, (block, sizes) in STAGE_SIZES.items()
  },
  **{
    f'efficientnet_{v}': (
      functools.partial(efficientnet.from_variant, v),
      (spec.resolution, spec.resolution, 3),
    )
    for v, spec in EFFICIENTNET_VARIANTS.items()
  },
}


def names() -> list[str]:
  """Lists the registered model names, in registration order.

  Returns:
    The names accepted by `create` and `input_shape`.
  """
  return list(_REGISTRY)


def _lookup(name: str) -> tuple[Callable[..., nn.Module], tuple[int, int, int]]:
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model '{name}'; valid names: {', '.join(names())}")
  return _REGISTRY[name]


def create(name: str, *, num_classes: int, **kwargs: Any) -> nn.Module:
  """Creates a registered model.

  Args:
    name: one of `names()`, e.g. ``'resnet20'`` or ``'efficientnet_b1'``.
    num_classes: number of output logits.
    **kwargs: module attributes, e.g. ``dtype=jnp.bfloat16``, ``axis_name='batch'``,
      ``bn_momentum``, ``depth_mult``/``width_mult`` for ``'micronet'``,
      ``same_padding`` for EfficientNets.

  Returns:
    The unbound linen module.

  Raises:
    ValueError: if ``name`` is not registered (the message lists the valid names).

  Example:
    >>> model = create('micronet', num_classes=100, depth_mult=2.0)
  """
  factory, _ = _lookup(name)
  return factory(num_classes=num_classes, **kwargs)


def input_shape(name: str) -> tuple[int, int, int]:
  """The default input shape ``(H, W, C)`` of a registered model.

  28x28x1 for LeNet-5, 32x32x3 for the CIFAR nets, 224x224x3 for the ImageNet
  ResNets, and the variant's resolution for EfficientNets (e.g. 240 for B1).

  Args:
    name: one of `names()`.

  Returns:
    ``(height, width, channels)``.

  Raises:
    ValueError: if ``name`` is not registered.
  """
  _, shape = _lookup(name)
  return shape
