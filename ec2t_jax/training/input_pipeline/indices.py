"""Record indices: the validation hold-out (`split_indices`), and `IndexedSource`, a view of
a source through an index array, padded and masked for evaluation."""

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np


def split_indices(num_train: int, validation_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits the 'train' split's record indices into training and validation.

  The validation set is the *last* `validation_size` records (for the
  embedded MNIST, the last records of MNIST's original order; for tfds
  datasets, of tfds' fixed on-disk order), so it never changes with the seed.

  Args:
    num_train: number of records of the 'train' split.
    validation_size: number held out, `0 <= validation_size < num_train`
      (see `DatasetSpec.validation_size` for the recipes' values).

  Returns:
    `(train_indices, validation_indices)`, int64 arrays, disjoint, covering
    `range(num_train)`.

  Example:
    >>> split_indices(10, 3)
    (array([0, 1, 2, 3, 4, 5, 6]), array([7, 8, 9]))
  """
  if num_train <= 0:
    raise ValueError(f'num_train must be > 0, got {num_train}')
  if not 0 <= validation_size < num_train:
    raise ValueError(
      f'validation_size must be in [0, num_train={num_train}), got {validation_size}'
    )
  cut = num_train - validation_size
  return np.arange(cut, dtype=np.int64), np.arange(cut, num_train, dtype=np.int64)


class IndexedSource:
  """A view of a random-access source through an index array, optionally padded.

  `source[i]` returns the record `data_source[indices[i]]`. With `pad_to`,
  the view is extended to `pad_to` records by repeating the first one, and
  every record gets a 'mask' field: True for real records, False for padding.

  Its `repr` is stable (no object addresses, a digest of the indices), as
  grain checks it when an iterator state is restored.
  """

  def __init__(
    self,
    data_source: Any,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    pad_to: int | None = None,
  ):
    self._source = data_source
    if indices is None:
      indices = np.arange(len(data_source), dtype=np.int64)
    self._indices = np.asarray(indices, np.int64)
    if self._indices.ndim != 1:
      raise ValueError(f'indices must be 1-D, got shape {self._indices.shape}')
    if self._indices.size and (self._indices.min() < 0 or self._indices.max() >= len(data_source)):
      raise ValueError(
        f'indices must lie in [0, {len(data_source)}), got range '
        f'[{self._indices.min()}, {self._indices.max()}]'
      )
    if pad_to is not None and pad_to < self._indices.size:
      raise ValueError(f'pad_to={pad_to} is smaller than len(indices)={self._indices.size}')
    if pad_to is not None and pad_to > 0 and self._indices.size == 0:
      raise ValueError('cannot pad an empty index set')
    self._pad_to = pad_to
    self._num_real = self._indices.size
    digest = hashlib.sha1(self._indices.tobytes()).hexdigest()[:12]
    source_repr = repr(data_source)
    if ' at 0x' in source_repr or len(source_repr) > 200:  # not stable or not short
      source_repr = type(data_source).__name__
    self._repr = (
      f'IndexedSource(source={source_repr}, '
      f'num_real={self._num_real}, pad_to={pad_to}, indices_sha1={digest})'
    )

  def __len__(self) -> int:
    return self._num_real if self._pad_to is None else self._pad_to

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'index {index} out of range [0, {len(self)})')
    real = index < self._num_real
    record = dict(self._source[int(self._indices[index if real else 0])])
    if self._pad_to is not None:
      record['mask'] = real
    return record

  def __repr__(self) -> str:
    return self._repr
