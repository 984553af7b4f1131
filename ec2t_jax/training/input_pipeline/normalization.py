"""Normalization statistics: the built-in datasets', those computed from training records
(`compute_normalization`), and `config.normalization` (`parse_normalization`)."""

import ast
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ec2t_jax.training import datasets
from ec2t_jax.training.datasets import Normalization
from ec2t_jax.training.input_pipeline.transforms import SelectFeatures

# Per-channel mean and std of pixel values scaled to [0, 1] of the built-in datasets
# (their registry entries, `DatasetSpec.normalization`, are the source).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
  name: datasets.get_spec(name).normalization
  for name in ('mnist', 'cifar10', 'cifar100', 'imagenet2012')
}
# Records read by `compute_normalization` from a source that is not in memory.
NORMALIZATION_MAX_RECORDS = 10_000


def compute_normalization(
  data_source: Any,
  indices: Sequence[int] | np.ndarray | None = None,
  *,
  max_records: int = NORMALIZATION_MAX_RECORDS,
  chunk_size: int = 4096,
) -> Normalization:
  """Per-channel mean and standard deviation of the pixel values (scaled to [0, 1]).

  Over every pixel of the records `indices` (default all) of `data_source`;
  the same numbers as `x.mean((0, 1, 2))` and `x.std((0, 1, 2))` of their
  stacked images `x / 255`, computed in float64 a chunk at a time. An
  `InMemorySource` is read whole; from any other source (files) at most
  `max_records` evenly spaced records are read, which may vary in size. A
  channel of zero spread gets std 1 (it is only centred).

  Args:
    data_source: random-access source of uint8 HWC images (`record['image']`).
    indices: the records to use, e.g. the training records without the
      validation ones (`split_indices`).
    max_records: the most records read from a source that is not in memory.
    chunk_size: records per vectorized step (in memory).

  Returns:
    `(mean, std)`, tuples of one Python float per channel.

  Raises:
    ValueError: for an empty set of records.

  Example:
    >>> train_idx, _ = split_indices(len(source), 500)
    >>> mean, std = compute_normalization(source, train_idx)
  """
  indices = np.arange(len(data_source)) if indices is None else np.asarray(indices, np.int64)
  if indices.size == 0:
    raise ValueError('cannot compute a normalization from no records')
  if isinstance(data_source, datasets.InMemorySource):
    chunks = (
      data_source.images[indices[i : i + chunk_size]] for i in range(0, indices.size, chunk_size)
    )
  else:
    if indices.size > max_records:
      indices = indices[np.linspace(0, indices.size - 1, max_records).round().astype(np.int64)]
    chunks = (np.asarray(SelectFeatures().map(data_source[int(i)])['image'])[None] for i in indices)
  total = squares = None
  count = 0
  for chunk in chunks:
    x = chunk.reshape(-1, chunk.shape[-1]).astype(np.float64) / 255.0
    total = x.sum(0) if total is None else total + x.sum(0)
    squares = (x * x).sum(0) if squares is None else squares + (x * x).sum(0)
    count += x.shape[0]
  mean = total / count
  std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
  std = np.where(std > 0, std, 1.0)
  return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def normalization_names() -> list[str]:
  """The registered datasets with statistics of their own: the names `parse_normalization` takes."""
  return sorted(name for name, spec in datasets.DATASETS.items() if spec.normalization is not None)


def parse_normalization(value: Any, channels: int) -> Normalization | None:
  """Reads a normalization setting (`config.normalization`): `(mean, std)` or None.

  Besides a pair of numbers, the setting can name a registered dataset with
  statistics of its own (`normalization_names()`: 'cifar10', 'cifar100',
  'imagenet2012', 'mnist', ...), whose statistics are then used.
  `config.normalization = 'cifar10'` is the setting for CIFAR-100 runs from
  imported original weights: the original implementation normalized
  CIFAR-100 with CIFAR-10's statistics.

  Args:
    value: '' / None / () (the dataset's own), a dataset name, a pair of
      per-channel sequences, or its text as written on a command line,
      e.g. '((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))'.
    channels: the images' channels; mean and std need one value per channel.

  Returns:
    `(mean, std)` as tuples of floats, or None for the dataset's own.

  Raises:
    ValueError: a name without statistics of its own, not a pair of
      `channels` numbers each, or a std that is not > 0.

  Example:
    >>> parse_normalization('[[0.5], [0.25]]', channels=1)
    ((0.5,), (0.25,))
    >>> parse_normalization('cifar10', channels=3) == datasets.get_spec('cifar10').normalization
    True
  """
  if value is None or (isinstance(value, (str, tuple, list)) and len(value) == 0):
    return None
  text = value
  expected = f'a pair (mean, std) of {channels} per-channel values each, e.g. ' + repr(
    str(((0.5,) * channels, (0.25,) * channels))
  )
  names = normalization_names()
  if isinstance(value, str) and re.fullmatch(r'[A-Za-z_][A-Za-z0-9_.-]*(:.*)?', value.strip()):
    name = value.strip()
    spec = datasets.DATASETS.get(name)
    if spec is None or spec.normalization is None:
      raise ValueError(
        f'config.normalization={text!r} names no dataset with statistics of its own; valid '
        f'names: {", ".join(names)}, or {expected}'
      )
    value = spec.normalization
  try:
    if isinstance(value, str):
      value = ast.literal_eval(value)
    mean, std = (tuple(float(v) for v in part) for part in value)
  except (ValueError, TypeError, SyntaxError):
    raise ValueError(
      f'config.normalization must be {expected}, or a dataset name ({", ".join(names)}); '
      f'got {text!r}'
    ) from None
  if len(mean) != channels or len(std) != channels:
    raise ValueError(
      f'config.normalization must be {expected}: the images have {channels} channels; got '
      f'{text!r} ({len(mean)} means, {len(std)} stds)'
    )
  if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
    raise ValueError(f'config.normalization needs finite means and stds > 0; got {text!r}')
  return mean, std
