"""Leaf names and per-leaf facts of pytrees: the one home for both in ec2t_jax.

Every module that names a leaf (`'conv2/kernel'`, `'params/conv2/kernel'`),
asks whether a leaf's values are ternary, or counts zeros per leaf calls these
functions; none of them keeps a copy.

Example:
  >>> import numpy as np
  >>> tree = {'conv': {'kernel': np.array([0.5, 0.0, -0.5]), 'bias': np.zeros(2)}}
  >>> [name for name, _ in named_leaves(tree)]
  ['conv/bias', 'conv/kernel']
  >>> ternary_levels(tree['conv']['kernel'])
  (0.5, 0.5)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
  'flat_dict',
  'leaf_dtypes',
  'is_masked',
  'magnitude_prune',
  'is_ternary',
  'named_leaves',
  'path_str',
  'selected_names',
  'strip_collection',
  'ternary_levels',
  'zero_fractions',
]


def is_masked(x: Any) -> bool:
  """True for the `optax.MaskedNode` placeholders that `optax.masked`/`partition` leave."""
  return isinstance(x, optax.MaskedNode)


def path_str(path: tuple[Any, ...]) -> str:
  """Joins a JAX key path into `'a/b/c'` (dict keys, attribute names and indices).

  The trailing `.value` attribute of a Flax NNX `Variable` (an `nnx.Param` in
  `nnx.state(model)`) is left out, so NNX and linen params have the same names
  (`'fc1/kernel'`).
  """
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == 'value':
    path = path[:-1]
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
    else:
      parts.append(str(key))
  return '/'.join(parts)


def named_leaves(tree: Any, *, skip_masked: bool = False) -> list[tuple[str, Any]]:
  """All `(path, leaf)` pairs of `tree` in JAX flattening order (sorted dict keys).

  Args:
    tree: any pytree.
    skip_masked: leave out `optax.MaskedNode` placeholders (they flatten to no
      leaf anyway; with this flag they are also not descended into).
  """
  is_leaf = is_masked if skip_masked else None
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return [(path_str(p), leaf) for p, leaf in flat if not (skip_masked and is_masked(leaf))]


def leaf_dtypes(tree: Any) -> dict[str, Any]:
  """`{path: dtype}` of every leaf of `tree` (arrays or scalars), keyed as `named_leaves`."""
  return {name: jnp.asarray(leaf).dtype for name, leaf in named_leaves(tree)}


def flat_dict(tree: Any, *, skip_masked: bool = False) -> dict[str, Any]:
  """`{path: leaf}` of `tree` (see `named_leaves`)."""
  return dict(named_leaves(tree, skip_masked=skip_masked))


def strip_collection(name: str, collection: str = 'params') -> str:
  """`'params/conv/kernel'` -> `'conv/kernel'`; other names are returned unchanged."""
  prefix = collection + '/'
  return name[len(prefix) :] if name.startswith(prefix) else name


def selected_names(mask: Any) -> set[str]:
  """Paths of the leaves a boolean mask selects, without a leading `'params/'`.

  Args:
    mask: a pytree of bools shaped like the params (or like
      `{'params': ..., 'batch_stats': ...}`), or None (selects nothing).
  """
  if mask is None:
    return set()
  if isinstance(mask, Mapping) and 'params' in mask:
    mask = mask['params']
  return {strip_collection(name) for name, flag in named_leaves(mask) if bool(flag)}


def ternary_levels(values: Any) -> tuple[float, float] | None:
  """`(w_p, w_n)` if the finite values are exactly `{-w_n, 0, +w_p}` (a subset counts).

  A level that does not occur is returned as 0.0. Integer arrays, empty arrays,
  non-finite values and more than one positive or negative level give None.

  Example:
    >>> ternary_levels(np.array([0.3, 0.0, -0.2, 0.3])), ternary_levels(np.array([0.1, 0.2]))
    ((0.3, 0.2), None)
  """
  v = np.asarray(jax.device_get(values))
  if v.dtype.kind != 'f' and v.dtype.name != 'bfloat16':
    return None
  if v.size == 0:
    return None
  v = v.astype(np.float64)
  if not np.all(np.isfinite(v)):
    return None
  pos = np.unique(v[v > 0])
  neg = np.unique(v[v < 0])
  if pos.size > 1 or neg.size > 1:
    return None
  return (float(pos[0]) if pos.size else 0.0, float(-neg[0]) if neg.size else 0.0)


def is_ternary(values: Any) -> bool:
  """True if `values` hold at most one positive and one negative level besides 0.

  Example:
    >>> is_ternary(np.array([0.3, 0.0, -0.2, 0.3])), is_ternary(np.array([0.1, 0.2]))
    (True, False)
  """
  return ternary_levels(values) is not None


def zero_fractions(tree: Any, mask: Any = None) -> tuple[dict[str, float], float]:
  """Per-leaf fraction of exact zeros, and the fraction over all those leaves together.

  Args:
    tree: a pytree of arrays (e.g. params).
    mask: a pytree of bools of the same structure selecting the leaves to count
      (e.g. the ternary mask), or None for every leaf.

  Returns:
    `({path: zeros/size}, total_zeros/total_size)`; the total is 0.0 when no
    leaf is selected.
  """
  leaves = named_leaves(jax.device_get(tree))
  flags = [True] * len(leaves) if mask is None else [bool(m) for m in jax.tree.leaves(mask)]
  if len(flags) != len(leaves):
    raise ValueError(f'mask has {len(flags)} leaves but the tree has {len(leaves)}')
  per_leaf, zeros, size = {}, 0, 0
  for (name, leaf), selected in zip(leaves, flags, strict=True):
    if not selected:
      continue
    arr = np.asarray(leaf)
    z = int(np.sum(arr == 0))
    per_leaf[name] = z / max(arr.size, 1)
    zeros += z
    size += arr.size
  return per_leaf, zeros / max(size, 1)


def magnitude_prune(params: Any, pattern: str, fraction: float) -> tuple[Any, list[str]]:
  """Zeroes the weights below `fraction` x the largest magnitude of each leaf matching `pattern`.

  The original EC2T code applies this to EfficientNet's depthwise kernels when
  it scores the finished network (`--prune-threshold 0.01`): a per-layer
  threshold relative to the layer's own largest weight.

  Args:
    params: a params pytree.
    pattern: a regex searched in each leaf's path (`'blocks_3/depthwise_conv/kernel'`).
    fraction: the threshold relative to each leaf's max |w|, in [0, 1).

  Returns:
    `(params with those weights zeroed, the pruned leaves' paths)`.

  Raises:
    ValueError: for a fraction outside [0, 1) or a pattern that matches no leaf.

  Example:
    >>> import numpy as np
    >>> pruned, names = magnitude_prune({'dw': {'kernel': np.array([0.005, -0.5, 1.0])}},
    ...                                 r'dw/kernel$', 0.01)
    >>> pruned['dw']['kernel'].tolist(), names
    ([0.0, -0.5, 1.0], ['dw/kernel'])
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f'the magnitude-pruning fraction must be in [0, 1), got {fraction!r}')
  regex = re.compile(pattern)
  names = []

  def prune(path, leaf):
    name = path_str(path)
    if not regex.search(name):
      return leaf
    names.append(name)
    values = np.asarray(leaf)
    threshold = fraction * np.max(np.abs(values), initial=0.0)
    return np.where(np.abs(values) < threshold, np.zeros((), values.dtype), values)

  pruned = jax.tree_util.tree_map_with_path(prune, params)
  if not names:
    names_all = [n for n, _ in named_leaves(params)]
    raise ValueError(
      f'magnitude-pruning pattern {pattern!r} matches no leaf; leaves are {names_all[:8]}'
    )
  return pruned, names
