"""A run's data: its sources, the train/validation split, and its batch iterators.

`open_data` opens the configured dataset once (`ec2t_jax.training.datasets`),
splits off the validation records and fixes the input normalization;
`create_input_iter` and `eval_batches` turn it into the training and evaluation
batches of this process (`ec2t_jax.training.input_pipeline`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import numpy as np

from ec2t_jax.training import datasets, input_pipeline
from ec2t_jax.training import spec as spec_lib
from ec2t_jax.training.runtime import Prefetch

__all__ = ['Data', 'create_input_iter', 'eval_batches', 'open_data']


class Data(NamedTuple):
  """A run's data: sources, the train/validation split and the batch sizes of this process.

  Attributes:
    train_source: random-access source of the 'train' split.
    test_source: the test split's source.
    train_indices: records of `train_source` used for training.
    val_indices: records of `train_source` held out for validation.
    steps_per_epoch: training batches per epoch.
    num_classes: classifier outputs.
    image_shape: one input image, `(height, width, channels)`.
    batch_size: training batch size of this process.
    eval_batch_size: evaluation batch size of this process.
    spec: the dataset's `datasets.DatasetSpec` (recipe, sizes, classes).
    normalization: per-channel `(mean, std)` of the pipelines: the config's,
      else the dataset's, else computed from the training records.
  """

  train_source: Any
  test_source: Any
  train_indices: np.ndarray
  val_indices: np.ndarray
  steps_per_epoch: int
  num_classes: int
  image_shape: tuple[int, ...]
  batch_size: int
  eval_batch_size: int
  spec: datasets.DatasetSpec | None = None
  normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None


def open_data(run: spec_lib.RunSpec) -> Data:
  """Opens the run's dataset, splits off the validation records, fixes the normalization.

  The user's data (`tfds:`, `npz:`, `folder:`) hold out 10 % of the training
  records (at most 5,000) unless `config.validation_size` says otherwise, and
  are normalized with the mean and std of the remaining training records
  unless `config.normalization` gives them.

  Args:
    run: the parsed run (`ec2t_jax.training.spec.parse`).

  Raises:
    datasets.DatasetNotPreparedError: for a tfds dataset not prepared yet.
    ValueError: for bad data, or a validation size, batch size or
      normalization the data cannot satisfy.
  """
  d = run.data
  spec = d.source
  # Images of varying size (ImageNet, some tfds data) cannot be held in memory.
  in_memory = d.in_memory and spec.image_shape is not None
  open_split = functools.partial(
    datasets.get_data_source, spec, data_dir=d.data_dir or None, in_memory=in_memory
  )
  train_source, test_source = open_split('train'), open_split(spec.test_split)
  num_train = d.num_train_examples or len(train_source)
  val_size = spec.validation_size if d.validation_size < 0 else d.validation_size
  if not 0 <= val_size < num_train:
    raise ValueError(f'config.validation_size must be in [0, {num_train}), got {val_size}')
  train_indices, val_indices = input_pipeline.split_indices(num_train, val_size)
  batch_size = d.batch_size // jax.process_count()
  steps_per_epoch = input_pipeline.num_batches(
    len(train_indices), batch_size=batch_size, train=True
  )
  if d.steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, d.steps_per_epoch)
  if steps_per_epoch <= 0:
    raise ValueError(
      f'{len(train_indices)} training examples make no batch of {d.batch_size}; '
      'lower config.batch_size'
    )
  num_classes, image_shape = d.num_classes, d.image_shape
  try:  # Refuses bad evaluation options now, not after the first epoch.
    input_pipeline.preprocess_ops(
      spec,
      train=False,
      image_size=d.eval_image_size or image_shape[0],
      **_eval_options(d),
    )
  except ValueError as e:
    raise ValueError(
      f'config.eval_image_size / eval_crop_fraction / eval_resize_method: {e}'
    ) from e
  normalization = input_pipeline.parse_normalization(
    d.normalization or None, channels=image_shape[-1]
  )
  if normalization is None:
    normalization = spec.normalization
  if normalization is None:
    normalization = input_pipeline.compute_normalization(train_source, train_indices)
    logging.info(
      'normalization of %s from its %d training records: mean %s, std %s '
      '(config.normalization overrides it)',
      spec.name,
      len(train_indices),
      *(', '.join(f'{v:.4f}' for v in part) for part in normalization),
    )
  if spec.normalization is None and isinstance(train_source, datasets.InMemorySource):
    val_classes = np.unique(train_source.labels[val_indices]).size
    if val_classes == 1 and spec.num_classes > 1:
      logging.warning(
        'the validation set of %s (the last %d training records) holds one class only: '
        'are the training records sorted by class? Shuffle them.',
        spec.name,
        len(val_indices),
      )
  return Data(
    train_source=train_source,
    test_source=test_source,
    train_indices=train_indices,
    val_indices=val_indices,
    steps_per_epoch=steps_per_epoch,
    num_classes=num_classes,
    image_shape=image_shape,
    batch_size=batch_size,
    eval_batch_size=d.eval_batch_size // jax.process_count(),
    spec=spec,
    normalization=normalization,
  )


def create_input_iter(run: spec_lib.RunSpec, data: Data) -> Prefetch:
  """The endless, checkpointable iterator of training batches, prefetched in a thread."""
  return Prefetch(
    _create_split(
      run,
      data,
      data.train_source,
      data.train_indices,
      batch_size=data.batch_size,
      train=True,
      worker_count=run.data.worker_count,
    )
  )


def _eval_options(d: spec_lib.DataSpec) -> dict[str, Any]:
  """The evaluation transform's options the run sets (`crop_fraction`, `resize_method`)."""
  options = {}
  if d.eval_crop_fraction:
    options['crop_fraction'] = d.eval_crop_fraction
  if d.eval_resize_method:
    options['resize_method'] = d.eval_resize_method
  return options


def _create_split(run, data, source, indices, **kwargs):
  """`input_pipeline.create_split` of `source` with the run's recipe and normalization."""
  image_size = data.image_shape[0]
  if not kwargs.get('train', True):
    kwargs.update(_eval_options(run.data))
    image_size = run.data.eval_image_size or image_size
  return input_pipeline.create_split(
    source,
    seed=run.runtime.seed,
    dataset=data.spec or run.data.name,
    image_size=image_size,
    normalization=data.normalization,
    indices=indices,
    **kwargs,
  )


def eval_batches(run: spec_lib.RunSpec, data: Data, split: str) -> Iterator[dict[str, Any]]:
  """One pass over the `'val'` or `'test'` split (at most `config.num_eval_examples`)."""
  if split == 'val':
    source, indices = data.train_source, data.val_indices
    if len(indices) == 0:
      return iter(())
  else:
    source, indices = data.test_source, None
  limit = run.data.num_eval_examples
  if limit:
    indices = np.arange(min(limit, len(source))) if indices is None else indices[:limit]
  return _create_split(
    run, data, source, indices, batch_size=data.eval_batch_size, train=False, num_epochs=1
  )
