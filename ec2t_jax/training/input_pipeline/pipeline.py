"""The batch iterators: `create_split` (a grain `DataLoader`, or `ArrayBatchIterator` for
in-memory data without per-record transforms), and `num_batches`."""

import json
import math
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from ec2t_jax.training import datasets
from ec2t_jax.training.datasets import Normalization
from ec2t_jax.training.input_pipeline.indices import IndexedSource
from ec2t_jax.training.input_pipeline.recipes import preprocess_ops
from ec2t_jax.training.input_pipeline.transforms import NormalizeBatch, SelectFeatures


class ArrayBatchIterator:
  """Training batches of an in-memory source that needs no per-record transform.

  The fast path of `create_split` for MNIST-like data: each epoch is a fresh
  permutation (seeded by `(seed, epoch)`) cut into *global* batches of
  `batch_size * shard_count`; shard `i` takes the `i`-th slice of each, so the
  global batches are the same however many processes share them. Every batch
  is one numpy gather plus the batch normalization — about a hundred times
  faster than per-record processing. Batches never cross an epoch boundary
  (the remainder is dropped, as `num_batches` counts).
  `get_state()`/`set_state()` give JSON bytes, like grain's iterators.
  """

  def __init__(
    self,
    source: datasets.InMemorySource,
    indices: np.ndarray | None,
    *,
    batch_size: int,
    seed: int,
    shard_index: int,
    shard_count: int,
    num_epochs: int | None,
    normalize: NormalizeBatch,
  ):
    self._source = source
    self._indices = np.arange(len(source)) if indices is None else np.asarray(indices)
    self._global_batch = batch_size * shard_count
    self._batches = len(self._indices) // self._global_batch
    self._batch_size = batch_size
    self._seed = seed
    self._shard = shard_index
    self._num_epochs = num_epochs
    self._normalize = normalize
    self._epoch, self._position = 0, 0
    self._order_epoch, self._order = -1, None

  def _epoch_order(self) -> np.ndarray:
    if self._order_epoch != self._epoch:
      perm = np.random.default_rng([self._seed, self._epoch]).permutation(len(self._indices))
      self._order = self._indices[perm]
      self._order_epoch = self._epoch
    return self._order

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._num_epochs is not None and self._epoch >= self._num_epochs:
      raise StopIteration
    start = self._position * self._global_batch + self._shard * self._batch_size
    keys = self._epoch_order()[start : start + self._batch_size]
    batch = self._normalize.map(
      {'image': self._source.images[keys], 'label': self._source.labels[keys]}
    )
    self._position += 1
    if self._position == self._batches:
      self._epoch, self._position = self._epoch + 1, 0
    return batch

  def get_state(self) -> bytes:
    """The position as JSON bytes."""
    return json.dumps(
      {'epoch': self._epoch, 'position': self._position, 'seed': self._seed}
    ).encode()

  def set_state(self, state: bytes) -> None:
    """Continues from a `get_state()` of an iterator built with the same arguments."""
    value = json.loads(state)
    if value.get('seed') != self._seed:
      raise ValueError(f'iterator state was saved with seed {value.get("seed")}, not {self._seed}')
    self._epoch, self._position = int(value['epoch']), int(value['position'])


def num_batches(
  num_records: int, *, batch_size: int, train: bool, shard_count: int | None = None
) -> int:
  """Batches per epoch and per process that `create_split` yields for `num_records` records.

  Training drops the remainder (`(num_records // shard_count) // batch_size`);
  evaluation pads (`ceil(num_records / (batch_size * shard_count))`).
  """
  shard_count = jax.process_count() if shard_count is None else shard_count
  if train:
    return (num_records // shard_count) // batch_size
  return math.ceil(num_records / (batch_size * shard_count))


def _has_random_ops(ops: Sequence[Any]) -> bool:
  return any(isinstance(op, grain.transforms.RandomMap) for op in ops)


class _Chain(grain.transforms.Map):
  """Several per-example transforms as one grain operation (less per-record overhead)."""

  def __init__(self, ops: Sequence[Any]):
    self.ops = list(ops)

  def map(self, element):
    for op in self.ops:
      element = op.map(element)
    return element


class _RandomChain(grain.transforms.RandomMap):
  """As `_Chain`, with random transforms; they share the record's generator, in order.

  grain hands every `RandomMap` of a pipeline the same per-record generator,
  so chaining gives exactly the draws of the separate operations.
  """

  def __init__(self, ops: Sequence[Any]):
    self.ops = list(ops)

  def random_map(self, element, rng: np.random.Generator):
    for op in self.ops:
      if isinstance(op, grain.transforms.RandomMap):
        element = op.random_map(element, rng)
      else:
        element = op.map(element)
    return element


def create_split(
  data_source: Any,
  *,
  batch_size: int,
  train: bool,
  seed: int,
  dataset: str | datasets.DatasetSpec = 'cifar10',
  image_size: int | None = None,
  normalization: Normalization | None = None,
  indices: Sequence[int] | np.ndarray | None = None,
  shard_index: int | None = None,
  shard_count: int | None = None,
  num_epochs: int | None = None,
  augment: bool | None = None,
  worker_count: int = 0,
  read_threads: int | None = None,
  prefetch_buffer_size: int = 256,
  crop_fraction: float | None = None,
  resize_method: str | None = None,
) -> grain.DataLoaderIterator:
  """An iterator of batches of `data_source` with the recipe of `dataset`.

  Training: records (of `indices`, default all) are shuffled every epoch
  (seeded), augmented (if `augment`), batched with the remainder dropped,
  and repeated `num_epochs` times (forever if `None`); batches run across
  epoch boundaries. Evaluation: one pass in order, the record list padded to
  a multiple of `batch_size * shard_count` so that every process yields the
  same number of full batches and every real record appears exactly once
  with `mask == True` (padding has `mask == False`).

  Args:
    data_source: random-access source, e.g. `datasets.get_data_source(...)`.
    batch_size: examples per batch *of this process* (the global batch is
      `batch_size * shard_count`).
    train: training (shuffle, augment, drop remainder) or evaluation.
    seed: non-negative 32-bit seed of the shuffle and the augmentations.
    dataset: the dataset whose recipe and normalization apply: a name
      ('mnist', 'cifar10', 'cifar100', 'imagenet2012', 'npz:/path/data.npz',
      ...) or its `DatasetSpec`.
    image_size: output size for ImageNet (default 224) and for tfds data of
      varying image size.
    normalization: `(mean, std)` per channel on the [0, 1] scale; required
      for datasets without their own (the user's data: see
      `compute_normalization`), else overrides theirs.
    indices: the records of `data_source` to use (see `split_indices`).
    shard_index: this process's shard; default `jax.process_index()`.
    shard_count: number of shards; default `jax.process_count()`.
    num_epochs: training epochs to yield (`None`: forever). Evaluation is
      always one epoch.
    augment: random augmentations on or off; defaults to `train`.
    worker_count: grain worker processes (0: in this process).
    read_threads: threads reading records (ahead of the transforms) in each
      process; default 0 for an `InMemorySource` (threads only add GIL
      contention there), else 8 (file reads and parsing).
    prefetch_buffer_size: records read ahead per process.
    crop_fraction: crop margin of the 'imagenet' recipe's evaluation
      transform, in (0, 1]; None: 0.875 (256 -> 224); 1.0: no margin. See
      `preprocess_ops`. Must be None for other recipes.
    resize_method: resampling of that transform, 'bilinear' (None: the
      default) or 'bicubic'. Must be None for other recipes.

  Returns:
    A `grain.DataLoaderIterator` of dicts 'image' float32 `(B, H, W, C)`,
    'label' int32 `(B,)`, and for evaluation 'mask' bool `(B,)`. It has
    `get_state() -> bytes` and `set_state(bytes)`.

  Raises:
    ValueError: bad sizes, seed, shard or epoch arguments, unknown dataset,
      bad `crop_fraction` or `resize_method`.

  Example:
    >>> it = create_split(source, batch_size=128, train=False, seed=0, dataset='mnist')
    >>> for batch in it: ...  # batch['mask'] marks the real examples
  """
  if batch_size <= 0:
    raise ValueError(f'batch_size must be > 0, got {batch_size}')
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f'seed must be an integer in [0, 2**32), got {seed!r}')
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if shard_count <= 0 or not 0 <= shard_index < shard_count:
    raise ValueError(
      f'need 0 <= shard_index < shard_count, got shard_index={shard_index}, '
      f'shard_count={shard_count}'
    )
  if num_epochs is not None and num_epochs <= 0:
    raise ValueError(f'num_epochs must be None or > 0, got {num_epochs}')
  if not train and num_epochs not in (None, 1):
    raise ValueError(f'evaluation makes exactly one pass; got num_epochs={num_epochs}')
  if read_threads is None:
    read_threads = 0 if isinstance(data_source, datasets.InMemorySource) else 8
  spec = datasets.get_spec(dataset)
  if normalization is None and spec.normalization is None:
    raise ValueError(
      f'dataset {spec.name!r} has no normalization of its own; pass normalization=(mean, std), '
      'e.g. compute_normalization(data_source, indices)'
    )
  mean, std = normalization or spec.normalization
  ops = preprocess_ops(
    spec,
    train=train,
    augment=augment,
    image_size=image_size,
    normalization=normalization,
    crop_fraction=crop_fraction,
    resize_method=resize_method,
  )

  if train:
    source = IndexedSource(data_source, indices)
    if len(source) // shard_count < batch_size:
      raise ValueError(
        f'{len(source)} training records over {shard_count} shards cannot fill '
        f'one batch of {batch_size}'
      )
  else:
    num_real = len(data_source) if indices is None else len(indices)
    if num_real == 0:
      raise ValueError('cannot evaluate on an empty set of records')
    global_batch = batch_size * shard_count
    source = IndexedSource(
      data_source, indices, pad_to=math.ceil(num_real / global_batch) * global_batch
    )
  if (
    train
    and isinstance(data_source, datasets.InMemorySource)
    and worker_count == 0
    # Only recipes without any random transform, so that `augment` never changes the order.
    and all(
      isinstance(op, SelectFeatures)
      for op in preprocess_ops(spec, train=True, augment=True, image_size=image_size)
    )
  ):
    # No per-record work to do: gather whole batches with numpy instead.
    return ArrayBatchIterator(
      data_source,
      None if indices is None else np.asarray(indices, np.int64),
      batch_size=batch_size,
      seed=int(seed),
      shard_index=int(shard_index),
      shard_count=int(shard_count),
      num_epochs=num_epochs,
      normalize=NormalizeBatch(mean, std),
    )
  # Equal shards: each process must run the same number of steps.
  shard_options = grain.sharding.ShardOptions(
    shard_index=int(shard_index), shard_count=int(shard_count), drop_remainder=True
  )
  sampler = grain.samplers.IndexSampler(
    num_records=len(source),
    shard_options=shard_options,
    shuffle=train,
    num_epochs=num_epochs if train else 1,
    # Per-record generators cost ~10 µs each; only random transforms need them.
    seed=int(seed) if train or _has_random_ops(ops) else None,
  )
  loader = grain.DataLoader(
    data_source=source,
    sampler=sampler,
    operations=[
      _RandomChain(ops) if _has_random_ops(ops) else _Chain(ops),
      grain.transforms.Batch(batch_size=batch_size, drop_remainder=train),
      NormalizeBatch(mean, std),
    ],
    worker_count=worker_count,
    shard_options=shard_options,
    read_options=grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size
    ),
  )
  return iter(loader)
