"""BatchNorm folding: which eval-mode BatchNorms follow a convolution, and folding them in.

With ``s = γ / sqrt(var + ε)`` the convolution's kernel becomes ``K·s`` and its bias
``(b - mean)·s + β`` (see `ec2t_jax.onnx_export`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from ec2t_jax import tree_util

__all__ = ['FoldedBatchNorm', 'folded_batch_norms']


class FoldedBatchNorm(NamedTuple):
  """One convolution and the eval-mode BatchNorm folded into it.

  Attributes:
    conv: the convolution's module path (``'layer1_0/conv1'``).
    norm: the BatchNorm's module path.
    scale: ``γ / sqrt(var + ε)``, one value per output channel.
    bias: ``(b - mean)·scale + β``, the folded convolution's bias.
  """

  conv: str
  norm: str
  scale: np.ndarray
  bias: np.ndarray


def _module_path(module: Any) -> str | None:
  scope = getattr(module, 'scope', None)
  return None if scope is None else '/'.join(scope.path)


def _foldable_norm(module: Any, args: tuple, kwargs: Mapping[str, Any]) -> bool:
  """Whether a BatchNorm call normalizes with its running averages over the last axis."""
  from flax import linen as nn

  if kwargs.get('mask') is not None or len(args) != 1:
    return False
  x = args[0]
  running = nn.merge_param(
    'use_running_average', module.use_running_average, kwargs.get('use_running_average')
  )
  axis = module.axis if isinstance(module.axis, int) else None
  return bool(running) and axis is not None and axis % x.ndim == x.ndim - 1


def _in_scope(eqn: Any, path: str) -> bool:
  """Whether an equation was traced inside the module at ``path`` (its JAX name stack)."""
  stack = '/' + str(eqn.source_info.name_stack) + '/'
  return f'/{path}/' in stack


def _only_feeds(jaxpr: Any, conv: str, norm: str) -> bool:
  """Whether every value the conv's equations hand out is read by the BatchNorm only.

  Folding replaces the conv's output by the BatchNorm's, so any other reader
  would change; a value that leaves the conv without a reader in ``norm``
  (or leaves the model) rules the pair out.
  """
  produced = {v for e in jaxpr.eqns if _in_scope(e, conv) for v in e.outvars}
  if not produced or produced & set(jaxpr.outvars):
    return False
  seen_norm = False
  for e in jaxpr.eqns:
    if _in_scope(e, conv):
      continue
    if any(v in produced for v in e.invars if not isinstance(v, jcore.Literal)):
      if not _in_scope(e, norm):
        return False
      seen_norm = True
  return seen_norm


def _pairs(model: Any, variables: Any, x: jax.ShapeDtypeStruct) -> list[tuple[str, str, float]]:
  """``[(conv path, BatchNorm path, ε)]`` of every BatchNorm whose input is a conv's output.

  The pairs come from the module calls (a BatchNorm called on exactly the
  array a ``nn.Conv`` returned), and each is confirmed on the traced jaxpr:
  nothing but the BatchNorm reads the conv's output. A module called more than
  once is never folded.
  """
  from flax import linen as nn

  calls: dict[str, int] = {}
  conv_out: dict[int, str] = {}
  keep = []  # Keeps the traced outputs alive, so that their ids stay unique.
  found = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != '__call__':
      return out
    path = _module_path(module)
    if path is None:
      return out
    calls[path] = calls.get(path, 0) + 1
    if isinstance(module, nn.Conv) and getattr(module, 'mask', None) is None:
      conv_out[id(out)] = path
      keep.append(out)
    elif isinstance(module, nn.BatchNorm) and args and id(args[0]) in conv_out:
      if _foldable_norm(module, args, kwargs):
        found.append((conv_out[id(args[0])], path, float(module.epsilon)))
    return out

  with nn.intercept_methods(record):
    closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
  return [
    p
    for p in found
    if calls[p[0]] == 1 and calls[p[1]] == 1 and _only_feeds(closed.jaxpr, p[0], p[1])
  ]


def folded_batch_norms(
  model: Any, variables: Any, input_shape: Sequence[int]
) -> list[FoldedBatchNorm]:
  """The convolution → BatchNorm pairs `to_onnx` folds, with their folded scale and bias.

  A pair is a ``flax.linen.Conv`` (without mask) whose output is the input of
  an ``nn.BatchNorm`` that normalizes over the last axis with its running
  averages (``train=False``), each module called once per forward pass.

  Args:
    model: a linen module called as ``model.apply(variables, x, train=False)``.
    variables: its variables (concrete arrays; ``batch_stats`` included).
    input_shape: one example's shape, without the batch, e.g. ``(32, 32, 3)``.

  Returns:
    One `FoldedBatchNorm` per pair, in call order.
  """
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  flat = tree_util.flat_dict(jax.device_get(variables))
  out = []
  for conv, norm, eps in _pairs(model, variables, x):

    def get(collection, path, name, default=None):
      value = flat.get(f'{collection}/{path}/{name}')
      return default if value is None else np.asarray(value, np.float64)

    mean = get('batch_stats', norm, 'mean')
    var = get('batch_stats', norm, 'var')
    if mean is None or var is None:
      continue
    gamma = get('params', norm, 'scale', 1.0)
    beta = get('params', norm, 'bias', 0.0)
    conv_bias = get('params', conv, 'bias', 0.0)
    scale = gamma / np.sqrt(var + eps)
    bias = (conv_bias - mean) * scale + beta
    dtype = np.asarray(flat[f'params/{conv}/kernel']).dtype
    out.append(FoldedBatchNorm(conv, norm, scale.astype(dtype), bias.astype(dtype)))
  return out


@contextlib.contextmanager
def _folding(folds: Mapping[str, tuple[Any, Any]], norms: set[str]) -> Iterator[None]:
  """Runs convs in ``folds`` with kernel ``K·scale`` and bias, and their BatchNorms as identity.

  ``folds`` maps a conv path to its (traced) ``(scale, bias)``.
  """
  from flax import linen as nn

  inside = []

  def fold(next_fun, args, kwargs, context):
    path = _module_path(context.module)
    if inside or context.method_name != '__call__' or path is None:
      return next_fun(*args, **kwargs)
    if path in norms:
      return args[0]
    if path in folds:
      module = context.module
      scale, bias = folds[path]
      kernel = module.variables['params']['kernel']
      conv = module.clone(parent=None, name=None, use_bias=True)
      inside.append(path)
      try:
        return conv.apply({'params': {'kernel': kernel * scale, 'bias': bias}}, *args, **kwargs)
      finally:
        inside.pop()
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(fold):
    yield
