"""Reading tfds datasets: the lazy tfds import, the `tfds:NAME` form, and unprepared datasets.

`tensorflow_datasets` is imported only by the functions that read tfds
datasets (`_tfds()`), never at module import.
"""

from __future__ import annotations

import importlib
import os

import numpy as np

from ec2t_jax.training.datasets.registry import (
  _RESIZE_HINT,
  DatasetSpec,
  _check_fixed_size,
  default_data_dir,
  get_spec,
  user_validation_size,
)


def _tfds():
  """`tensorflow_datasets`, imported on first use (it is not needed for in-memory data)."""
  return importlib.import_module('tensorflow_datasets')


class DatasetNotPreparedError(FileNotFoundError):
  """A stock tfds dataset has not been prepared (in array_record format) yet."""


def prepare_command(name: str | DatasetSpec, data_dir: str | os.PathLike | None = None) -> str:
  """The one-time shell command that prepares tfds dataset `name` for `get_data_source`.

  Example:
    >>> prepare_command('cifar10', '/data/tfds')
    'tfds build cifar10 --file_format=array_record --data_dir=/data/tfds'
  """
  spec = get_spec(name)
  data_dir = default_data_dir(data_dir)
  command = f'tfds build {spec.tfds_name} --file_format=array_record --data_dir={data_dir}'
  if spec.tfds_name == 'imagenet2012':
    command += f' --manual_dir={os.path.join(data_dir, "downloads", "manual")}'
  return command


def _not_prepared_message(spec: DatasetSpec, data_dir: str) -> str:
  """Why `spec` cannot be read and how to prepare it, as sentences (shown joined on one line)."""
  sentences = [
    f'dataset {spec.name!r} (tfds {spec.tfds_name!r}) is not prepared in array_record '
    f'format under {data_dir}.',
  ]
  if spec.tfds_name == 'imagenet2012':
    sentences.append(
      'ImageNet cannot be downloaded by tfds: first place ILSVRC2012_img_train.tar and '
      f'ILSVRC2012_img_val.tar in {os.path.join(data_dir, "downloads", "manual")}.'
    )
  sentences += [
    f'Prepare it once with `{prepare_command(spec, data_dir)}` (tfds build needs '
    '`pip install tensorflow-cpu tensorflow-datasets`, e.g. in a separate environment).',
    'Or set --config.data_dir (or $TFDS_DATA_DIR) to where it is prepared.',
  ]
  return '\n'.join(sentences)


def _tfds_spec(argument: str, *, data_dir: str, image_size: int | None) -> DatasetSpec:
  """The spec of `tfds:NAME` from the builder's info (see the module docstring)."""
  tfds = _tfds()
  name = f'tfds:{argument}'
  try:
    builder = tfds.builder(argument, data_dir=data_dir)
  except Exception as e:  # noqa: BLE001 - DatasetNotFoundError and its relatives.
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip('.')
    raise ValueError(
      f'dataset {name!r}: {first_line}; NAME must be a tfds builder name (tfds.list_builders()), '
      'optionally with its config, e.g. tfds:fashion_mnist or tfds:imagenette/160px'
    ) from None
  info = builder.info
  features = info.features
  keys = sorted(features.keys()) if hasattr(features, 'keys') else []
  if (
    'image' not in keys
    or 'label' not in keys
    or not isinstance(features['label'], tfds.features.ClassLabel)
    or len(features['image'].shape) != 3
  ):
    raise ValueError(
      f'dataset {name!r} is not an image classification dataset: it needs an image feature '
      f"'image' (H, W, C) and a ClassLabel 'label', and has features {keys}"
    )
  image_dtype = np.dtype(getattr(features['image'], 'np_dtype', np.uint8))
  if image_dtype != np.uint8:  # The pipeline divides pixels by 255: only 8-bit ones are right.
    raise ValueError(
      f'dataset {name!r} stores {image_dtype} images; the input pipeline reads uint8 pixels '
      '(0..255), so prepare a uint8 version of the dataset (e.g. its 8-bit config) or convert '
      'it to npz:/folder: data with uint8 images'
    )
  sizes = {split: int(split_info.num_examples) for split, split_info in info.splits.items()}
  provisional = DatasetSpec(name, argument, 0, None, {}, 'test', 0)
  if not sizes:  # Not prepared, or under tfds.testing.mock_data: try to open the splits.
    for split in ('train', 'test', 'validation'):
      if split == 'validation' and 'test' in sizes:
        break
      try:
        source = tfds.data_source(argument, split=split, data_dir=data_dir, download=False)
        sizes[split] = len(source)
      except Exception:  # noqa: BLE001, S112 - a split that cannot be opened is absent.
        continue
  if not sizes:
    raise DatasetNotPreparedError(_not_prepared_message(provisional, data_dir))
  test_split = next((s for s in ('test', 'validation') if s in sizes), None)
  if 'train' not in sizes or test_split is None:
    raise ValueError(
      f"dataset {name!r} needs a 'train' split and a 'test' or 'validation' split; it has "
      f'{sorted(sizes)}'
    )
  shape = tuple(features['image'].shape)
  fixed = all(d is not None for d in shape)
  if not fixed and image_size is None:
    raise ValueError(f'dataset {name!r} has images of varying size {shape}; {_RESIZE_HINT}')
  if fixed:
    _check_fixed_size(name, shape, image_size)
  class_names = tuple(features['label'].names)
  return DatasetSpec(
    name=name,
    tfds_name=argument,
    num_classes=int(features['label'].num_classes),
    image_shape=shape if fixed else None,
    split_sizes=sizes,
    test_split=test_split,
    validation_size=user_validation_size(sizes['train']),
    recipe='none' if fixed else 'resize',
    channels=int(shape[-1] or 3),
    class_names=class_names or None,
    version=str(getattr(info, 'version', '') or ''),
  )
