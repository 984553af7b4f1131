"""Function-preserving growth of residual networks (Net2Net-style).

Chen, Goodfellow & Shlens, "Net2Net: Accelerating Learning via Knowledge
Transfer", ICLR 2016 (arXiv 1511.05641). A trained small network initialises a
deeper and/or wider one that computes exactly the same function, so the big
network starts from the small one's accuracy instead of from scratch — e.g. to
reach a compound-scaled MicroNet (docs/algorithm.md §8) through intermediate sizes.

**Deeper.** Stage ``i`` of the small net has blocks ``layer{i}_0 …
layer{i}_{n-1}``; the big net's extra blocks ``layer{i}_{n} …`` are appended at
the end of the stage. Their kernels are He-normal, ``N(0, 2/fan_in)`` (the
zoo's init for MicroNet and the CIFAR ResNets), their BatchNorms standard
(scale 1, bias 0, mean 0, var 1), except that the scale *and* bias of the last
BatchNorm of the residual branch are zero, so the branch outputs exactly 0 and
the block is the identity:

* MicroNet: ``x + bn3(…) = x`` (no activation after the addition);
* CIFAR ResNet / ResNet-18/34/50: ``relu(x + bn2(…)) = relu(x) = x``, since
  every block input is already the output of a ReLU.

(Goyal et al. 2017 initialise the last BN scale to zero for the same reason;
the zero bias is what makes the block an exact identity here.)

**Wider** (MicroNet only: the other families have fixed widths). Each channel
space of size ``n`` that grows to ``N`` gets a map ``g``: new channel ``k``
copies old channel ``g(k)``, with ``g(k) = k`` for ``k < n`` and ``g(k)`` drawn
uniformly from ``[0, n)`` otherwise. Output channels of convs, dense layers and
BatchNorm (scale, bias and the running statistics) are replicated; a layer
*reading* a replicated channel divides those input weights among the copies so
that their sum is unchanged: ``W'[…, k, o] = W[…, g(k), g(o)] · r[k]`` with
``Σ_{k: g(k)=j} r[k] = 1`` — ``r = 1/count`` (``split='equal'``, Net2Net) or a
random positive split per weight (``split='random'``), which computes the same
function but breaks the symmetry between copies so that they can diverge in
training. One map per ``(n, N)`` pair is shared by all spaces of those sizes,
which keeps every space consistent: in particular the residual stream of a
stage, which flows through the identity shortcuts, is replicated identically
in every block that reads or writes it.

Not supported: widening models whose channel spaces are joined by
parameter-free channel operations (the option-A zero-padding shortcut of the
CIFAR ResNets, whose widths are fixed anyway), and EfficientNets.
"""

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from ec2t_jax import models

__all__ = ['SUPPORTED', 'grow']

_SUPPORTED = (models.MicroNet, models.CifarResNet, models.ResNet)
# The model classes `grow` accepts (the small and the big model of one class).
SUPPORTED = _SUPPORTED
# Attributes that may differ between the small and the big model: what grows,
# and what does not change the eval-mode function.
_GROWABLE = {
  models.MicroNet: {'depth_mult', 'width_mult'},
  models.CifarResNet: {'depth'},
  models.ResNet: {'stage_sizes'},
}
_IRRELEVANT = {
  'dtype',
  'param_dtype',
  'bn_momentum',
  'axis_name',
  'dropout_rate',
  'parent',
  'name',
}
_SPLITS = ('equal', 'random')
_BLOCK = re.compile(r'layer(\d+)_(\d+)')


def _check_models(small: nn.Module, big: nn.Module) -> None:
  if type(small) not in _SUPPORTED or type(big) is not type(small):
    raise ValueError(
      'grow supports two models of the same class among '
      f'{[c.__name__ for c in _SUPPORTED]}, got {type(small).__name__} -> {type(big).__name__}'
    )
  skip = _GROWABLE[type(small)] | _IRRELEVANT
  for field in dataclasses.fields(small):
    if field.name in skip:
      continue
    a, b = getattr(small, field.name), getattr(big, field.name)
    if a != b:
      raise ValueError(f'{field.name} must be equal in both models, got {a!r} and {b!r}')


def _last_bn(block_params: Mapping[str, Any]) -> str:
  """The last BatchNorm of a residual branch: the highest-numbered ``bn{k}``.

  MicroNet ``bn3`` (``bn1`` is its pre-activation), CIFAR/basic ResNet ``bn2``,
  bottleneck ``bn3``.
  """
  return max((n for n in block_params if re.fullmatch(r'bn\d+', n)), key=lambda n: int(n[2:]))


def _blocks_per_stage(params: Mapping[str, Any]) -> dict[int, int]:
  """Blocks per stage: ``{stage: count}``."""
  stages: dict[int, int] = {}
  for name in params:
    if m := _BLOCK.fullmatch(name):
      stages[int(m[1])] = max(stages.get(int(m[1]), 0), int(m[2]) + 1)
  return stages


def _roles(ndim: int) -> list[str]:
  """Axis roles: the last axis is a layer's output channels, a kernel's second-last its input."""
  roles = ['fixed'] * ndim
  if ndim:
    roles[-1] = 'out'
  if ndim >= 2:
    roles[-2] = 'in'
  return roles


def _check_growable(name: str, small: tuple[int, ...], big: tuple[int, ...]) -> None:
  if len(small) != len(big):
    raise ValueError(f'{name}: rank {len(small)} in the small model, {len(big)} in the big one')
  for axis, (role, n, m) in enumerate(zip(_roles(len(small)), small, big, strict=True)):
    if m != n and (role == 'fixed' or m < n):
      raise ValueError(
        f'{name}: cannot grow axis {axis} from {n} to {m} '
        f'(shape {small} -> {big}; only channel axes may grow)'
      )


class _Widener:
  """Replicates channel axes with one map per (small size, big size) pair."""

  def __init__(self, rng: np.random.Generator, split: str):
    self._rng = rng
    self._split = split
    self._maps: dict[tuple[int, int], np.ndarray] = {}

  def _map(self, n: int, big: int) -> np.ndarray:
    if (n, big) not in self._maps:
      extra = self._rng.integers(0, n, big - n)
      self._maps[(n, big)] = np.concatenate([np.arange(n), extra])
    return self._maps[(n, big)]

  def _split_factors(self, shape: tuple[int, ...], axis: int, g: np.ndarray) -> np.ndarray:
    """Factors ``r`` along ``axis`` with ``Σ_{k: g(k)=j} r[k] = 1``, broadcastable to ``shape``."""
    n = int(g.max()) + 1
    if self._split == 'equal':
      r = 1.0 / np.bincount(g, minlength=n)[g]
      return r.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    u = np.moveaxis(self._rng.uniform(0.5, 1.5, shape), axis, 0)
    totals = np.zeros((n, *u.shape[1:]), u.dtype)
    np.add.at(totals, g, u)
    return np.moveaxis(u / totals[g], 0, axis)

  def __call__(self, small: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Grows ``small`` to ``shape`` (already checked by ``_check_growable``)."""
    out = small
    for axis, role in enumerate(_roles(small.ndim)):
      if small.shape[axis] == shape[axis]:
        continue
      g = self._map(small.shape[axis], shape[axis])
      out = np.take(out, g, axis=axis)
      if role == 'in':
        out = out * self._split_factors(out.shape, axis, g).astype(out.dtype)
    return out


def _numpy_rng(rng: jax.Array | int | None) -> np.random.Generator:
  """A numpy generator seeded from a jax key (typed or raw), an int, or 0.

  The draws are numpy's: jax would compile one random kernel per distinct shape.
  """
  if rng is None:
    return np.random.default_rng(0)
  if isinstance(rng, jax.Array):
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.key_data(rng)
    return np.random.default_rng(np.ravel(np.asarray(rng)).astype(np.uint32))
  return np.random.default_rng(rng)


def _fresh(rng: np.random.Generator, key: tuple[str, ...], shape, last_bn: bool) -> np.ndarray:
  """A new block's variable: He-normal kernels, standard BN, zero last-BN scale and bias."""
  leaf = key[-1]
  if leaf == 'kernel':
    fan_in = int(np.prod(shape[:-1]))
    return rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
  if leaf in ('scale', 'var') and not last_bn:
    return np.ones(shape)
  return np.zeros(shape)  # bias, mean, and the last BN's scale: the branch outputs exactly 0.


def grow(
  small_variables: Mapping[str, Any],
  small_model: nn.Module,
  big_model: nn.Module,
  *,
  rng: jax.Array | int | None = None,
  split: str = 'equal',
) -> dict[str, Any]:
  """Initialises a deeper and/or wider model that computes the small model's function.

  In eval mode (running BatchNorm statistics, no dropout) the grown model's
  logits equal the small model's up to float rounding. See the module
  docstring for the construction.

  Args:
    small_variables: ``{'params': ..., 'batch_stats': ...}`` of ``small_model``.
    small_model: a ``MicroNet``, ``CifarResNet`` or ``ResNet`` module.
    big_model: a module of the same class with at least as many blocks per
      stage and (MicroNet) at least as many channels everywhere; all other
      attributes that change the function (``num_classes``, ``bn_epsilon``,
      ``block``) must be equal.
    rng: a jax key or an int seeding the new blocks' kernels, the channel
      maps and the random split (numpy draws); 0 if None.
    split: how a replicated input channel's weights are divided among its
      copies: ``'equal'`` (``1/count``) or ``'random'`` (random positive
      shares summing to 1, to break the symmetry between copies).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` of ``big_model``.

  Raises:
    ValueError: for unsupported or mismatched models, a big model with fewer
      blocks or channels, differing shortcut structure, or an unknown ``split``.

  Example:
    >>> small = models.create('resnet20', num_classes=10)
    >>> big = models.create('resnet56', num_classes=10)
    >>> big_variables = grow(small_variables, small, big)
  """
  if split not in _SPLITS:
    raise ValueError(f'split must be one of {list(_SPLITS)}, got {split!r}')
  _check_models(small_model, big_model)
  np_rng = _numpy_rng(rng)

  # Parameter shapes of these families do not depend on the resolution.
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  big_shapes = jax.eval_shape(
    lambda x: big_model.init(jax.random.key(0), x, train=False),
    x,
  )
  small_blocks = _blocks_per_stage(small_variables['params'])
  big_blocks = _blocks_per_stage(big_shapes['params'])
  for stage, n in small_blocks.items():
    if big_blocks.get(stage, 0) < n:
      raise ValueError(
        f'stage {stage}: the big model has {big_blocks.get(stage, 0)} blocks, '
        f'fewer than the small model ({n})'
      )

  collections = ('params', 'batch_stats')
  small_flat = traverse_util.flatten_dict({c: small_variables.get(c, {}) for c in collections})
  big_flat = traverse_util.flatten_dict({c: big_shapes.get(c, {}) for c in collections})
  unused = set(small_flat) - set(big_flat)
  if unused:
    names = sorted('/'.join(k) for k in unused)
    raise ValueError(f'variables of the small model missing from the big one: {names[:10]}')

  # Check everything before building anything.
  new_keys = set()
  for key, big_leaf in big_flat.items():
    block = _BLOCK.fullmatch(key[1])
    if block is not None and int(block[2]) >= small_blocks.get(int(block[1]), 0):
      new_keys.add(key)
    elif key not in small_flat:
      raise ValueError(
        f'{"/".join(key)} exists in the big model but not in the small one '
        '(different shortcut structure?)'
      )
    else:
      _check_growable('/'.join(key), tuple(np.shape(small_flat[key])), tuple(big_leaf.shape))

  widen = _Widener(np_rng, split)
  out = {}
  for key, big_leaf in big_flat.items():
    if key in new_keys:
      last_bn = key[0] == 'params' and key[2] == _last_bn(big_shapes['params'][key[1]])
      value = _fresh(np_rng, key, big_leaf.shape, last_bn)
    else:
      value = widen(np.asarray(small_flat[key]), big_leaf.shape)
    out[key] = jnp.asarray(value, big_leaf.dtype)
  return traverse_util.unflatten_dict(out)
