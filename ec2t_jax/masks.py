"""Static parameter selection: which leaves are ternary, pruned or full precision.

Masks are pytrees of Python bools with the structure of the params, built from
parameter *paths* (e.g. `'layer1_0/conv1/kernel'`) and shapes only, never from
values. The EC2T math never looks at names; these helpers are the only place
that does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import optax

from ec2t_jax import tree_util

MaskOrFn = Any  # A pytree of bools, or a callable `params -> pytree of bools`.


def _kernels_in_creation_order(params: Mapping[str, Any], prefix: str = '') -> list[str]:
  """Paths of `kernel` leaves in dict insertion order (Flax: the order layers were created)."""
  out = []
  for key, value in params.items():
    path = f'{prefix}/{key}' if prefix else str(key)
    if isinstance(value, Mapping):
      out.extend(_kernels_in_creation_order(value, path))
    elif key == 'kernel' and getattr(value, 'ndim', 0) >= 2:
      out.append(path)
  return out


def call_order(model: Any, *args: Any, method: str = '__call__', **kwargs: Any) -> list[str]:
  """Paths of the modules that own a `kernel`, in the order the forward pass calls them.

  JAX rebuilds dicts with sorted keys, so after `jit` or `eval_shape` the
  params no longer tell which layer comes first. This traces
  `model.init(..., *args, **kwargs)` abstractly (no FLOPs, no memory) and records
  the module call order, e.g. `['conv1', 'layer1_0/conv1', ..., 'linear']`.

  Args:
    model: a Flax linen module.
    *args: example inputs (arrays or `jax.ShapeDtypeStruct`).
    method: the module method to trace.
    **kwargs: further keyword arguments of that method (e.g. `train=False`).

  Returns:
    Module paths, each once, in first-call order.
  """
  from flax import linen as nn  # Local import: masks.py itself needs no Flax.

  order: list[str] = []

  def record(next_fun, call_args, call_kwargs, context):
    module = context.module
    if context.method_name == '__call__' and module.path:
      path = '/'.join(str(p) for p in module.path)
      if path not in order:
        order.append(path)
    return next_fun(*call_args, **call_kwargs)

  def init(rng, *inputs):
    with nn.intercept_methods(record):
      return model.init(rng, *inputs, method=method, **kwargs)

  jax.eval_shape(init, jax.random.key(0), *args)
  return order


def from_paths(params: optax.Params, selected: Iterable[str]) -> optax.Params:
  """A bool mask that is True exactly at the given `'a/b/kernel'` paths.

  Raises:
    ValueError: if a path is not a leaf of `params`.
  """
  selected = set(selected)
  names = {name for name, _ in tree_util.named_leaves(params)}
  unknown = sorted(selected - names)
  if unknown:
    raise ValueError(
      f'unknown parameter paths {unknown[:5]}; valid ones include {sorted(names)[:8]}'
    )
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  return jax.tree_util.tree_unflatten(treedef, [tree_util.path_str(p) in selected for p, _ in flat])


def from_regex(params: optax.Params, include: str, exclude: str | None = None) -> optax.Params:
  """True where the leaf path matches `include` (`re.search`) and not `exclude`.

  Example:
    >>> from_regex({'a': {'kernel': 1.0, 'bias': 0.0}}, r'kernel$')
    {'a': {'bias': False, 'kernel': True}}
  """
  inc = re.compile(include)
  exc = re.compile(exclude) if exclude else None

  def pick(path, _):
    name = tree_util.path_str(path)
    return bool(inc.search(name)) and not (exc is not None and exc.search(name))

  return jax.tree_util.tree_map_with_path(pick, params)


def default_ternary_mask(
  params: Mapping[str, Any],
  *,
  order: list[str] | None = None,
  keep_first: bool = True,
  keep_last: bool = True,
  keep_pattern: str | None = r'(shortcut|downsample)',
) -> optax.Params:
  """The reference selection (docs/algorithm.md §1): every kernel except the first and last.

  The first and last kernels are found in the order Flax created the layers
  (the params dict's insertion order), i.e. the stem convolution and the
  classifier. Kernels whose path matches `keep_pattern` (1x1 projection
  shortcuts) stay full precision too. Biases, BatchNorm scales and all other
  leaves are never selected.

  Args:
    params: a Flax params dict (as returned by `model.init(...)['params']`).
    order: module paths in forward order (`call_order(model, x)`); without it
      the params dict's insertion order is used, which is right for params
      straight from `model.init` but not after `jit` rebuilt the dict.
    keep_first: keep the first kernel in full precision.
    keep_last: keep the last kernel in full precision.
    keep_pattern: regex of kernel paths that stay full precision, or None.

  Returns:
    A pytree of bools with the structure of `params`.
  """
  kernels = _kernels_in_creation_order(params)
  if order is not None:
    rank = {path: i for i, path in enumerate(order)}
    missing = [k for k in kernels if k.rsplit('/', 1)[0] not in rank]
    if missing:
      raise ValueError(f'kernels {missing[:5]} are not in the given call order {order[:5]}...')
    kernels = sorted(kernels, key=lambda k: rank[k.rsplit('/', 1)[0]])
  chosen = list(kernels)
  if keep_first and chosen:
    chosen = chosen[1:]
  if keep_last and chosen:
    chosen = chosen[:-1]
  if keep_pattern:
    pattern = re.compile(keep_pattern)
    chosen = [k for k in chosen if not pattern.search(k)]
  return from_paths(params, chosen)


def resolve(mask: MaskOrFn | None, params: optax.Params) -> optax.Params:
  """Turns a mask or mask function into a bool pytree with the structure of `params`.

  `None` selects nothing. Raises a ValueError if the structures differ.
  """
  if mask is None:
    return jax.tree.map(lambda _: False, params)
  if isinstance(mask, Callable):
    mask = mask(params)
  try:
    return jax.tree.map(lambda m, _: bool(m), mask, params)
  except ValueError as e:
    raise ValueError(
      'the mask must have the same tree structure as the params: '
      f'{jax.tree.structure(mask)} vs {jax.tree.structure(params)}'
    ) from e
