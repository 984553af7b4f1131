"""Static parameter selection: which leaves are ternary, pruned or full precision.

Masks are pytrees of Python bools with the structure of the params, built from
parameter *paths* (e.g. `'layer1_0/conv1/kernel'`) and shapes only, never from
values. The EC2T math never looks at names; these helpers are the only place
that does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from ec2t_jax import tree_util

MaskOrFn = Any  # A pytree of bools, or a callable `params -> pytree of bools`.


# Leaf names that hold a layer's weight matrix: Flax's Dense/Conv `kernel` and the
# `embedding` table of `nn.Embed` / `nnx.Embed` (an embedding counts as a first layer).
_WEIGHT_NAMES = ('kernel', 'embedding')


def _weights_in_insertion_order(params: Any, prefix: str = '') -> list[str]:
  """Paths of weight leaves in dict insertion order (Flax: the order layers were created)."""
  out = []
  for key, value in params.items():
    path = f'{prefix}/{key}' if prefix else str(key)
    if key in _WEIGHT_NAMES and getattr(value, 'ndim', 0) >= 2:
      out.append(path)
    elif isinstance(value, Mapping):
      out.extend(_weights_in_insertion_order(value, path))
  return out


class _Dims(NamedTuple):
  """What a weight reads and writes: channel counts (None: token ids, or unknown)."""

  name: str
  ins: tuple[int, ...]
  outs: tuple[int, ...]
  embedding: bool
  conv: bool
  dense: bool


def _dims(name: str, shape: tuple[int, ...], all_outs: set[int]) -> _Dims:
  if name.endswith('/embedding') or name == 'embedding':
    return _Dims(name, (), (shape[-1],), True, False, False)
  if len(shape) == 2:
    return _Dims(name, (shape[0],), (shape[1],), False, False, True)
  if len(shape) == 4:
    cin, cout = shape[-2], shape[-1]
    if cin == 1 and cout in all_outs:  # Depthwise: reads the channels it writes.
      cin = cout
    return _Dims(name, (cin,), (cout,), False, True, False)
  # DenseGeneral (attention) and other layouts: count every plausible grouping
  # as read and written, so they never look like an end of the network.
  groupings = {shape[0], shape[-1], math.prod(shape[1:]), math.prod(shape[:-1])}
  return _Dims(name, tuple(groupings), tuple(groupings), False, False, False)


def _ends_from_shapes(weights: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str]]:
  """First- and last-layer candidates found from shapes alone (independent of dict order).

  A weight whose input channels no other weight produces reads the network's
  input (a Dense after a flattened conv counts as fed by it when its input
  size is a multiple of the conv's channels); a weight whose outputs no other
  weight reads writes the network's output. Embeddings are always first layers.
  """
  outs_by = {n: s[-1] for n, s in weights.items()}
  dims = {n: _dims(n, s, {o for m, o in outs_by.items() if m != n}) for n, s in weights.items()}
  first, last = [], []
  for name, d in dims.items():
    others = [o for m, o in dims.items() if m != name]
    produced = {c for o in others for c in o.outs}
    consumed = {c for o in others for c in o.ins}
    if d.embedding:
      first.append(name)
      continue
    fed = all(
      c in produced or (d.dense and any(o.conv and c % o.outs[0] == 0 for o in others))
      for c in d.ins
    )
    read = all(
      c in consumed or (d.conv and any(o.dense and o.ins[0] % c == 0 for o in others))
      for c in d.outs
    )
    if not fed:
      first.append(name)
    if not read:
      last.append(name)
  return sorted(first), sorted(last)


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
  params: Any,
  *,
  order: list[str] | None = None,
  keep_first: bool = True,
  keep_last: bool = True,
  keep_pattern: str | None = r'(shortcut|downsample)',
) -> optax.Params:
  """The reference selection (docs/algorithm.md §1): every kernel except the first and last.

  Selects the `kernel` leaves of two or more dimensions (Dense, Conv,
  DenseGeneral) except the network's first and last layer and kernels whose
  path matches `keep_pattern` (1x1 projection shortcuts). Biases, norms,
  embeddings and all other leaves stay full precision; an `nn.Embed`/`nnx.Embed`
  table counts as a first layer.

  Which layer is first and last is decided without trusting the params dict's
  key order (`jax.jit`, `jax.eval_shape` and checkpoint restores rebuild dicts
  with sorted keys):

  * with `order` (module paths in forward order, `call_order(model, x)`), from it;
  * otherwise from the shapes: the first layer is the one whose input channels
    no other layer produces, the last the one whose outputs no other layer
    reads. If the shapes name more or less than one of each, or disagree with
    a creation order still visible in the dict, this refuses with a
    `ValueError` that says what to pass instead. The same params therefore
    give the same mask from `model.init`, `jax.jit(model.init)`, a restored
    checkpoint or `nnx.state(model)`.

  Args:
    params: the params pytree (linen `variables['params']` or NNX `nnx.state(model, nnx.Param)`).
    order: module paths in forward order (`call_order(model, x)`).
    keep_first: keep the first layer in full precision.
    keep_last: keep the last layer in full precision.
    keep_pattern: regex of kernel paths that stay full precision, or None.

  Returns:
    A pytree of bools with the structure of `params`.

  Raises:
    ValueError: when the first and last layer cannot be told (see above).

  Example:
    >>> import numpy as np
    >>> params = {'classifier': {'kernel': np.zeros((32, 10))},
    ...           'body': {'kernel': np.zeros((784, 32))},
    ...           'mlp': {'kernel': np.zeros((32, 32))}}
    >>> default_ternary_mask(params)
    {'body': {'kernel': False}, 'classifier': {'kernel': False}, 'mlp': {'kernel': True}}
  """
  weights = {
    name: tuple(np.shape(leaf))
    for name, leaf in tree_util.named_leaves(params)
    if name.rsplit('/', 1)[-1] in _WEIGHT_NAMES and np.ndim(leaf) >= 2
  }
  if order is not None:
    rank = {path: i for i, path in enumerate(order)}
    missing = [k for k in weights if k.rsplit('/', 1)[0] not in rank]
    if missing:
      raise ValueError(f'kernels {missing[:5]} are not in the given call order {order[:5]}...')
    ranked = sorted(weights, key=lambda k: rank[k.rsplit('/', 1)[0]])
    first, last = ranked[:1], ranked[-1:]
  else:
    first, last = _ends_from_shapes(weights)
    if any(name.endswith('/embedding') for name in first):
      first = [name for name in first if name.endswith('/embedding')]
    created = _weights_in_insertion_order(params) if isinstance(params, Mapping) else []
    if created != sorted(created) and (created[:1], created[-1:]) != (first[:1], last):
      first = []  # The dict still shows the creation order, and it disagrees: refuse.
    if not first or len(last) != 1 or (len(first) > 1 and not first[0].endswith('/embedding')):
      raise ValueError(
        'cannot tell the first and last layer of these params from their names and shapes '
        f'(first-layer candidates {first[:4]}, last-layer candidates {last[:4]}); pass '
        'order=ec2t_jax.masks.call_order(model, example_input, train=False), or select the '
        "ternary leaves yourself: ec2t_jax.masks.from_regex(params, r'...'), "
        'ec2t_jax.masks.from_paths(params, [...]) or any function params -> bools'
      )
  kept = set()
  if keep_first:
    kept |= set(first)
  if keep_last:
    kept |= set(last)
  pattern = re.compile(keep_pattern) if keep_pattern else None
  chosen = [
    k
    for k in weights
    if k.endswith('kernel') and k not in kept and not (pattern and pattern.search(k))
  ]
  return from_paths(params, chosen)


def resolve(mask: MaskOrFn | None, params: optax.Params) -> optax.Params:
  """Turns a mask or mask function into a bool pytree with the structure of `params`.

  `None` selects nothing. Raises a ValueError if the structures differ.
  """
  if mask is None:
    return jax.tree.map(lambda _: False, params)
  if isinstance(mask, Callable):
    mask = mask(params)

  def one_bool(path, m, _):
    if np.ndim(m) != 0:  # An element-wise mask: masks select whole leaves.
      raise _MaskLeafError(
        f'the mask leaf {jax.tree_util.keystr(path)} is an array of shape {np.shape(m)}; a mask '
        'holds one bool per params leaf (True selects the whole leaf), not one per element'
      )
    return bool(m)

  try:
    return jax.tree_util.tree_map_with_path(one_bool, mask, params)
  except _MaskLeafError as e:
    raise ValueError(str(e)) from None
  except ValueError as e:
    raise ValueError(_structure_difference(mask, params)) from e


class _MaskLeafError(ValueError):
  pass


def _structure_difference(mask: Any, params: Any) -> str:
  """One line saying where `mask` and `params` differ (paths, else node types)."""
  paths = [
    {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(t)[0]}
    for t in (mask, params)
  ]
  only_mask, only_params = sorted(paths[0] - paths[1]), sorted(paths[1] - paths[0])
  if only_mask or only_params:
    detail = f'leaves only in the mask: {only_mask[:4]}; only in the params: {only_params[:4]}'
  else:  # The same paths under containers of other types (e.g. a dict and a FrozenDict).
    detail = (
      f'the same leaf paths under other container types ({type(mask).__name__} vs '
      f'{type(params).__name__})'
    )
  return f'the mask must have the same tree structure as the params: {detail}'
