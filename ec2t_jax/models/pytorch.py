"""Import PyTorch checkpoints into the Flax model zoo, and export them back.

EC2T starts from a trained full-precision model (docs/algorithm.md §2: ``W ← pretrained
kernel``); the published checkpoints are PyTorch ``state_dict``s. This module
maps them, name by name and layout by layout, onto the variables of the models
in :mod:`ec2t_jax.models`:

================  ==================================  ================================
family            PyTorch names                        Flax names
================  ==================================  ================================
LeNet-5           ``conv1``, ``fc1``, ...              ``conv1``, ``fc1``, ...
CIFAR ResNets     ``layer2.0.conv1``                   ``layer2_0/conv1``
MicroNet          ``layer2.0.shortcut.0`` / ``.1``     ``layer2_0/shortcut_conv`` / ``_bn``
ResNet-18/34/50   ``layer2.0.downsample.0`` / ``.1``   ``layer2_0/downsample_conv`` / ``_bn``
EfficientNet      ``_blocks.3._depthwise_conv``        ``blocks_3/depthwise_conv``
================  ==================================  ================================

(the EfficientNet names are those of the ``efficientnet_pytorch`` package:
every module name gets a leading underscore.)

Layouts: a convolution kernel goes from PyTorch's ``(out, in/groups, kh, kw)``
to Flax's ``(kh, kw, in/groups, out)`` (so a depthwise ``(C, 1, k, k)`` becomes
``(k, k, 1, C)``); a dense kernel from ``(out, in)`` to ``(in, out)``. BatchNorm
``weight``/``bias`` become ``params`` ``scale``/``bias`` and ``running_mean``/
``running_var`` become ``batch_stats`` ``mean``/``var``; ``num_batches_tracked``
is ignored on import. LeNet-5's ``fc1`` reads a flattened feature map, which
PyTorch flattens in NCHW ``(c, h, w)`` order and Flax in NHWC ``(h, w, c)``
order, so its input rows are permuted as well.
"""

import math
import os
import pickle
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ec2t_jax import models

__all__ = ['from_pytorch', 'supported_models', 'to_pytorch']

# How many offending names a mismatch error lists per kind of problem.
_MAX_LISTED = 10

# Model-name patterns, first match wins (so ResNet-18/34/50 are tried before
# the CIFAR ResNets).
_FAMILY_PATTERNS = (
  ('lenet', re.compile(r'lenet\d*')),
  ('resnet', re.compile(r'resnet(18|34|50|101|152)')),
  ('cifar_resnet', re.compile(r'resnet\d+')),
  ('micronet', re.compile(r'micronet.*')),
  ('efficientnet', re.compile(r'efficientnet_b\d')),
)

# (module path of a dense layer that reads a flattened map, module path of the
# conv that produced the map): the dense input rows are permuted (c,h,w)->(h,w,c).
_FLATTENED_DENSE = {'lenet': {('fc1',): ('conv2',)}}

_PARAM_TO_TORCH = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}
_STATS_TO_TORCH = {'mean': 'running_mean', 'var': 'running_var'}
_SEQUENTIAL_SUFFIX = {'_conv': '0', '_bn': '1'}


def _family(model_name: str) -> str | None:
  for family, pattern in _FAMILY_PATTERNS:
    if pattern.fullmatch(model_name):
      return family
  return None


def supported_models() -> tuple[str, ...]:
  """Names of the registered models this module can convert.

  Returns:
    The names of :func:`ec2t_jax.models.names` that belong to a supported family
    (LeNet-5, CIFAR ResNets, MicroNet, ResNet-18/34/50, EfficientNet-B0..B7).
  """
  return tuple(n for n in models.names() if _family(n) is not None)


def _check_model_name(model_name: str) -> str:
  family = _family(model_name)
  if family is None or model_name not in models.names():
    raise ValueError(
      f'cannot convert model {model_name!r}; supported models: {list(supported_models())}'
    )
  return family


def _torch_module_name(family: str, path: tuple[str, ...]) -> str:
  """Translates a Flax module path to the PyTorch module name."""
  parts = []
  for name in path:
    if m := re.fullmatch(r'(layer\d+)_(\d+)', name):
      parts += [m[1], m[2]]
    elif family == 'efficientnet' and (m := re.fullmatch(r'blocks_(\d+)', name)):
      parts += ['_blocks', m[1]]
    elif family == 'efficientnet':
      parts.append('_' + name)
    elif m := re.fullmatch(r'(shortcut|downsample)(_conv|_bn)', name):
      parts += [m[1], _SEQUENTIAL_SUFFIX[m[2]]]
    else:
      parts.append(name)
  return '.'.join(parts)


# Layout conversions. Each returns (to_flax, to_torch, torch_shape_of_flax_shape).
_Layout = tuple[
  Callable[[np.ndarray], np.ndarray],
  Callable[[np.ndarray], np.ndarray],
  Callable[[tuple[int, ...]], tuple[int, ...]],
]


def _identity_layout() -> _Layout:
  return (lambda a: a), (lambda a: a), (lambda s: tuple(s))


def _conv_layout() -> _Layout:
  # torch (O, I, H, W) <-> flax (H, W, I, O).
  return (
    lambda a: np.transpose(a, (2, 3, 1, 0)),
    lambda a: np.transpose(a, (3, 2, 0, 1)),
    lambda s: (s[3], s[2], s[0], s[1]),
  )


def _dense_layout() -> _Layout:
  return (lambda a: a.T), (lambda a: a.T), (lambda s: (s[1], s[0]))


def _flattened_dense_layout(channels: int, features: int) -> _Layout:
  """Dense layer after a flatten: also permutes input rows (c, h, w) <-> (h, w, c)."""
  side = math.isqrt(features // channels)
  if side * side * channels != features:
    raise ValueError(f'cannot unflatten {features} inputs into a square map of {channels}')

  def to_flax(a: np.ndarray) -> np.ndarray:
    out = a.shape[0]
    a = a.reshape(out, channels, side, side).transpose(0, 2, 3, 1)
    return a.reshape(out, features).T

  def to_torch(a: np.ndarray) -> np.ndarray:
    out = a.shape[1]
    a = a.T.reshape(out, side, side, channels).transpose(0, 3, 1, 2)
    return a.reshape(out, features)

  return to_flax, to_torch, (lambda s: (s[1], s[0]))


class _Entry:
  """One variable: its PyTorch name, Flax location, Flax shape and layout."""

  def __init__(
    self,
    torch_name: str,
    flat_key: tuple[str, ...],
    shape: tuple[int, ...],
    dtype: Any,
    layout: _Layout,
  ):
    self.torch_name = torch_name
    self.flat_key = flat_key  # (collection, *module_path, leaf)
    self.shape = tuple(shape)
    self.dtype = dtype
    self.to_flax, self.to_torch, torch_shape = layout
    self.torch_shape = torch_shape(self.shape)


def _entries(family: str, variables: Mapping[str, Any]) -> list[_Entry]:
  """Lists the PyTorch counterpart of every leaf of ``variables``."""
  flat = traverse_util.flatten_dict(
    {c: variables[c] for c in ('params', 'batch_stats') if c in variables}
  )
  flattened = _FLATTENED_DENSE.get(family, {})
  entries = []
  for key, leaf in flat.items():
    collection, path, leaf_name = key[0], key[1:-1], key[-1]
    table = _PARAM_TO_TORCH if collection == 'params' else _STATS_TO_TORCH
    if leaf_name not in table:
      raise ValueError(
        f'cannot convert variable {"/".join(key)}: unknown leaf {leaf_name!r} '
        f'(known: {sorted(table)})'
      )
    layout = _identity_layout()
    if leaf_name == 'kernel' and len(leaf.shape) == 4:
      layout = _conv_layout()
    elif leaf_name == 'kernel' and len(leaf.shape) == 2:
      layout = _dense_layout()
      if path in flattened:
        producer = ('params', *flattened[path], 'kernel')
        layout = _flattened_dense_layout(flat[producer].shape[-1], leaf.shape[0])
    name = f'{_torch_module_name(family, path)}.{table[leaf_name]}'
    entries.append(_Entry(name, key, leaf.shape, leaf.dtype, layout))
  names = [e.torch_name for e in entries]
  if len(set(names)) != len(names):  # Guards the name translation, not user input.
    raise AssertionError(f'ambiguous PyTorch names for {family}: {sorted(names)}')
  return entries


def _bn_modules(entries: list[_Entry]) -> list[str]:
  return [e.torch_name[: -len('.running_mean')] for e in entries if e.flat_key[-1] == 'mean']


def _to_numpy(value: Any) -> np.ndarray:
  """A numpy array from a numpy/jax array or a torch tensor (bfloat16 included)."""
  if hasattr(value, 'detach'):  # torch.Tensor, without importing torch.
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _load(path: str | os.PathLike) -> Mapping[str, Any]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f'loading {os.fspath(path)!r} needs PyTorch, an optional extra: '
      "pip install 'ec2t_jax[torch]' (or pass the state_dict as a mapping of arrays)"
    ) from e
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no PyTorch file at {path!r}')
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    # torch's message suggests weights_only=False, which would run the file's code: never.
    lines = [s.strip() for s in str(e).splitlines()]
    detail = next((s for s in lines if 'Unsupported' in s or 'Trying to load' in s), lines[0])
    if 'GLOBAL' not in detail and 'global' not in detail:  # Not a pickle of tensors at all.
      raise ValueError(
        f'{path!r} cannot be read as a PyTorch file ({detail[:120]}); is it truncated, or not '
        'written by torch.save?'
      ) from e
    raise ValueError(
      f'{path!r} is not a plain PyTorch state_dict ({detail[:120]}): it holds objects that only '
      'a full unpickling, which runs code from the file, could rebuild; save the weights with '
      'torch.save(model.state_dict(), path)'
    ) from e
  except Exception as e:  # noqa: BLE001 - torch.load raises many types on bad files.
    detail = ' '.join(str(e).split())[:160] or 'no detail'
    raise ValueError(
      f'{path!r} cannot be read as a PyTorch file ({type(e).__name__}: {detail}); is it empty, '
      'truncated, or not written by torch.save?'
    ) from e
  if isinstance(obj, Mapping):
    # Training checkpoints often wrap the weights: {'state_dict': {...}, 'epoch': ...}.
    for key in ('state_dict', 'model_state_dict', 'model'):
      if isinstance(obj.get(key), Mapping) and not hasattr(obj.get(key), 'detach'):
        return obj[key]
    return obj
  raise ValueError(f'{path!r} holds a {type(obj).__name__}, not a state_dict')


def _normalize(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Strips DataParallel's `module.` prefix, drops `num_batches_tracked`, checks the names.

  Raises:
    TypeError: for a name that is not a string.
    ValueError: for two entries that name one tensor (`conv1.weight` and
      `module.conv1.weight`).
  """
  out, original = {}, {}
  for name, value in state_dict.items():
    if not isinstance(name, str):
      raise TypeError(f'state_dict keys must be strings, got {name!r}')
    short = name.removeprefix('module.')  # torch.nn.DataParallel / DDP.
    if short.endswith('num_batches_tracked'):
      continue
    if short in out:
      raise ValueError(
        f'state_dict holds both {original[short]!r} and {name!r}, which name the same tensor; '
        'keep one'
      )
    out[short], original[short] = value, name
  return out


def _check_values(name: str, value: np.ndarray) -> None:
  """Refuses complex or non-finite tensors (a real network's weights are neither)."""
  if value.dtype.kind == 'c':
    raise ValueError(f'{name} is complex ({value.dtype}); the models have real weights')
  if value.dtype.kind == 'f' and not np.all(np.isfinite(value)):
    bad = int(np.size(value) - np.sum(np.isfinite(value)))
    raise ValueError(f'{name} holds {bad} NaN/inf values; is the checkpoint broken?')
  if value.dtype.kind not in 'fiub':
    raise ValueError(f'{name} has dtype {value.dtype}, not a number type')


_CLASSIFIER = {
  'lenet': 'fc3.bias',
  'cifar_resnet': 'linear.bias',
  'micronet': 'linear.bias',
  'resnet': 'fc.bias',
  'efficientnet': '_fc.bias',
}


def _abstract_variables(model: Any, model_name: str) -> dict[str, Any]:
  # The registry's input shape: it matters for LeNet-5's flatten only.
  x = jax.ShapeDtypeStruct((1, *models.input_shape(model_name)), jnp.float32)
  key = jax.random.key(0)
  return jax.eval_shape(lambda x: model.init({'params': key, 'dropout': key}, x, train=False), x)


def _mismatch_message(model_name, missing, extra, wrong) -> str:
  lines = [f'state_dict does not match {model_name}:']

  def section(title, items):
    if items:
      lines.append(f'  {title} ({len(items)}):')
      lines.extend(f'    {item}' for item in items[:_MAX_LISTED])
      if len(items) > _MAX_LISTED:
        lines.append(f'    ... and {len(items) - _MAX_LISTED} more')

  section('missing', [f'{e.torch_name}: expected shape {e.torch_shape}' for e in missing])
  section('unexpected', [f'{n}: shape {s}' for n, s in extra])
  section(
    'wrong shape',
    [f'{e.torch_name}: expected {e.torch_shape}, found {s}' for e, s in wrong],
  )
  return '\n'.join(lines)


def from_pytorch(
  state_dict: Mapping[str, Any] | str | os.PathLike,
  model_name: str,
  *,
  num_classes: int | None = None,
  **model_kwargs: Any,
) -> dict[str, Any]:
  """Converts a PyTorch ``state_dict`` into the variables of a Flax zoo model.

  The expected variables are traced from ``models.create(model_name, ...)``
  (``jax.eval_shape`` of its ``init``, so nothing is computed) and the whole
  ``state_dict`` is checked against them before anything is converted.

  Args:
    state_dict: a mapping from PyTorch names to arrays (numpy arrays or torch
      tensors), or the path of a ``.pt``/``.pth`` file, read with
      ``torch.load(map_location='cpu', weights_only=True)`` (needs the optional
      ``torch`` extra); a ``{'state_dict': ...}`` wrapper is unwrapped. A leading
      ``module.`` (DataParallel) is stripped; ``num_batches_tracked`` is ignored.
    model_name: a name of :func:`supported_models`.
    num_classes: classifier outputs; inferred from the classifier bias if None.
    **model_kwargs: further arguments of ``models.create`` (e.g. ``depth_mult``
      and ``width_mult`` for MicroNet).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` nested dicts of ``jax.Array`` in the
    model's parameter dtype; ``batch_stats`` is ``{}`` for models without
    BatchNorm (LeNet-5).

  Raises:
    ValueError: for an unknown model name (listing the supported ones), or if
      names or shapes do not match the model: one error listing missing and
      unexpected names and wrong shapes, with expected vs found shapes in
      PyTorch layout.
    ImportError: if ``state_dict`` is a path and PyTorch is not installed.

  Example:
    >>> sd = torch.load('resnet20.pth', map_location='cpu', weights_only=True)
    >>> variables = from_pytorch(sd, 'resnet20')
    >>> logits = models.create('resnet20', num_classes=10).apply(variables, x)
  """
  if not isinstance(model_name, str):
    raise TypeError(
      f'model_name must be a model name such as {supported_models()[0]!r}, got '
      f'{type(model_name).__name__}; supported: {list(supported_models())}'
    )
  family = _check_model_name(model_name)
  if isinstance(state_dict, (str, os.PathLike)):
    state_dict = _load(state_dict)
  if not isinstance(state_dict, Mapping):
    raise TypeError(f'state_dict must be a mapping or a path, got {type(state_dict).__name__}')
  given = _normalize(state_dict)
  if num_classes is None:
    bias = given.get(_CLASSIFIER[family])
    if bias is None:
      names = sorted(given)
      raise ValueError(
        f'cannot infer num_classes: the state_dict has no {_CLASSIFIER[family]!r} (the '
        f'classifier bias of {model_name}), so it may be the weights of another model '
        f'(its first names: {names[:4]}); check the model name, or pass num_classes'
      )
    num_classes = int(np.shape(_to_numpy(bias))[0])
  model = models.create(model_name, num_classes=num_classes, **model_kwargs)
  entries = _entries(family, _abstract_variables(model, model_name))

  expected = {e.torch_name: e for e in entries}
  missing = [e for e in entries if e.torch_name not in given]
  extra = [(n, tuple(np.shape(v))) for n, v in given.items() if n not in expected]
  arrays, wrong = {}, []
  for e in entries:
    if e.torch_name in given:
      value = _to_numpy(given[e.torch_name])
      _check_values(e.torch_name, value)
      if value.shape != e.torch_shape:
        wrong.append((e, value.shape))
      else:
        arrays[e.flat_key] = value
  if missing or extra or wrong:
    raise ValueError(_mismatch_message(model_name, missing, extra, wrong))

  flat = {e.flat_key: jnp.asarray(e.to_flax(arrays[e.flat_key]), e.dtype) for e in entries}
  variables = traverse_util.unflatten_dict(flat)
  variables.setdefault('batch_stats', {})
  return variables


def to_pytorch(variables: Mapping[str, Any], model_name: str) -> dict[str, np.ndarray]:
  """Converts Flax zoo variables into a PyTorch ``state_dict`` of numpy arrays.

  The inverse of :func:`from_pytorch`. Every BatchNorm also gets a
  ``num_batches_tracked`` entry, a 0-d ``int64`` zero (PyTorch only reads it
  when ``momentum=None``), so that ``module.load_state_dict`` works with
  ``strict=True`` after ``{k: torch.from_numpy(v) for k, v in sd.items()}``.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of a model of
      ``model_name`` (any other collection is ignored).
    model_name: a name of :func:`supported_models`; it selects the naming
      scheme, the shapes come from ``variables``.

  Returns:
    A dict from PyTorch names to numpy arrays in PyTorch layout.

  Raises:
    ValueError: for an unknown model name, or a variable the naming scheme
      does not know.

  Example:
    >>> sd = to_pytorch(variables, 'resnet20')
    >>> torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
  """
  family = _check_model_name(model_name)
  entries = _entries(family, variables)
  flat = traverse_util.flatten_dict(
    {c: variables[c] for c in ('params', 'batch_stats') if c in variables}
  )
  out = {}
  for e in entries:
    out[e.torch_name] = np.array(e.to_torch(np.asarray(flat[e.flat_key])), order='C')
  for module in _bn_modules(entries):
    out[f'{module}.num_batches_tracked'] = np.zeros((), np.int64)
  return out
