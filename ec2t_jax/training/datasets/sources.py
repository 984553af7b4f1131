"""Data sources by name: `get_data_source` and `num_examples` of any registered dataset.

A split is a tfds `ArrayRecordDataSource` (the embedded MNIST is prepared
first), or an `InMemorySource` for data held in memory; split specs may be
sliced as tfds allows ('train[:1000]', 'train[:10%]', 'a+b').
"""

from __future__ import annotations

import os

import numpy as np

from ec2t_jax.training.datasets.embedded import load_embedded_mnist, prepare_embedded_mnist
from ec2t_jax.training.datasets.memory import InMemorySource
from ec2t_jax.training.datasets.registry import (
  DatasetSpec,
  _check_split,
  default_data_dir,
  get_spec,
)
from ec2t_jax.training.datasets.tfds_source import (
  DatasetNotPreparedError,
  _not_prepared_message,
  _tfds,
)


def get_data_source(
  name: str | DatasetSpec,
  split: str,
  *,
  data_dir: str | os.PathLike | None = None,
  in_memory: bool = False,
):
  """Returns a random-access source of dataset `name`'s `split`.

  `mnist` is built from the embedded copy on first use (no network). tfds
  datasets are opened with `tfds.data_source(..., download=False)`; the
  user's `npz:` and `folder:` data are always in memory.

  Args:
    name: a form of `valid_forms()` ('mnist', 'cifar10', 'tfds:fashion_mnist',
      'npz:/path/data.npz', ...), or a `DatasetSpec` (e.g. of
      `spec_for_config`).
    split: a split of that dataset ('train', 'test'; 'validation' for
      ImageNet), optionally sliced as tfds allows ('train[:1000]').
    data_dir: tfds data dir (see `default_data_dir`).
    in_memory: read the whole split into an `InMemorySource` (a few
      seconds; much faster pipelines). Fixed-size datasets only (not
      ImageNet).

  Returns:
    A tfds `ArrayRecordDataSource` (or an `InMemorySource`): `len(source)`
    and `source[i]`, a dict with at least 'image' (uint8 `(H, W, C)`) and
    'label' (int).

  Raises:
    ValueError: unknown dataset or split name; `in_memory` for ImageNet.
    DatasetNotPreparedError: a tfds dataset is not prepared in array_record
      format; the message gives the `tfds build` command.

  Example:
    >>> train = get_data_source('mnist', 'train', data_dir='/tmp/tfds')
  """
  spec = get_spec(name, data_dir=data_dir)
  _check_split(spec, split)
  if spec.arrays is not None:
    return _array_source(spec, split)
  if in_memory and spec.image_shape is None:
    raise ValueError(f'dataset {spec.name!r} has images of varying size; in_memory must be False')
  if in_memory and spec.embedded and split in ('train', 'test'):
    # The embedded arrays are the dataset's records in the same order: no tfds read needed.
    images, labels = load_embedded_mnist()[split]
    return InMemorySource(images.reshape(-1, 28, 28, 1), labels, name=f'{spec.name}:{split}')
  source = _open(spec, split, default_data_dir(data_dir))
  if in_memory:
    return InMemorySource.from_source(source, name=f'{spec.name}:{split}')
  return source


def _array_source(spec: DatasetSpec, split: str) -> InMemorySource:
  """An `InMemorySource` of a (possibly sliced) split of data held in `spec.arrays`."""
  parts = [
    (spec.arrays[base][0][start:stop], spec.arrays[base][1][start:stop])
    for base, start, stop in _split_ranges(split, spec.split_sizes)
  ]
  if len(parts) == 1:
    images, labels = parts[0]
  else:
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
  return InMemorySource(images, labels, name=f'{spec.name}:{split}')


def _open(spec: DatasetSpec, split: str, data_dir: str):
  tfds = _tfds()
  if spec.embedded:
    prepare_embedded_mnist(data_dir)
    return tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False)
  try:
    return tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False)
  except Exception as e:
    # tfds reports a missing dataset as an unsupported TFRECORD file format
    # (or an assertion), which hides the actual fix; name it instead.
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    if not builder.is_prepared():
      raise DatasetNotPreparedError(_not_prepared_message(spec, data_dir)) from e
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
      raise DatasetNotPreparedError(
        f'dataset {spec.name!r} is prepared at {builder.data_dir} in '
        f'{builder.info.file_format.value} format, which has no random access. '
        + _not_prepared_message(spec, data_dir)
      ) from e
    raise


def _split_ranges(split: str, sizes: dict[str, int]) -> list[tuple[str, int, int]]:
  """`[(split name, start, stop), ...]` of a tfds split spec ('train', 'train[:10%]', 'a+b')."""
  if split in sizes:  # Plain split names need no tfds.
    return [(split, 0, sizes[split])]
  tfds = _tfds()
  infos = {
    name: tfds.core.SplitInfo(name=name, shard_lengths=[n], num_bytes=0)
    for name, n in sizes.items()
  }
  ranges = []
  for instruction in tfds.core.ReadInstruction.from_spec(split).to_absolute(infos):
    n = sizes[instruction.splitname]
    start = instruction.from_ or 0
    stop = n if instruction.to is None else instruction.to
    ranges.append((instruction.splitname, start, max(start, stop)))
  return ranges


def _sliced_size(split: str, sizes: dict[str, int]) -> int:
  """Size of a tfds split spec ('train', 'train[:10%]', 'a+b') from the full split sizes."""
  return sum(stop - start for _, start, stop in _split_ranges(split, sizes))


def num_examples(
  name: str | DatasetSpec,
  split: str,
  *,
  fallback: int | None = None,
  data_dir: str | os.PathLike | None = None,
) -> int:
  """Number of examples of `name`'s `split`.

  Order of precedence: the true sizes of the embedded MNIST and of data held
  in memory; the prepared tfds dataset's `info.splits`; `fallback`.
  `info.splits` is empty when the dataset is not prepared and under
  `tfds.testing.mock_data`, where the fallback (a config value equal to the
  mock's `num_examples`) is used.

  Args:
    name: a registered dataset name or form, or a `DatasetSpec`.
    split: a split name, optionally sliced ('train[:1000]').
    fallback: the size to use when tfds does not know it.
    data_dir: tfds data dir (see `default_data_dir`).

  Returns:
    The number of examples.

  Raises:
    ValueError: unknown dataset or split, or unknown size and no fallback.

  Example:
    >>> num_examples('mnist', 'train[:10%]')
    6000
  """
  spec = get_spec(name, data_dir=data_dir)
  _check_split(spec, split)
  if spec.embedded or spec.arrays is not None:
    return _sliced_size(split, spec.split_sizes)
  try:
    builder = _tfds().builder(spec.tfds_name, data_dir=default_data_dir(data_dir))
    size = builder.info.splits[split].num_examples
  except (KeyError, ValueError):
    size = None
  if size:
    return int(size)
  if fallback is not None:
    return int(fallback)
  raise ValueError(
    f'the size of {spec.name!r} split {split!r} is unknown to tfds (not prepared, or '
    'mocked); pass fallback=<number of examples>'
  )
