"""The registry of datasets: `DatasetSpec`, `register`, `get_spec`, and a config's dataset.

Also the tfds data dir (`default_data_dir`) and the rules common to the
user's data (`tfds:`, `npz:`, `folder:`): the default validation size, and
which `config.image_size` values mean "not set". The built-in entries are
registered by `ec2t_jax.training.datasets.builtin`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping

import numpy as np

# The user's data: the validation set's default size is this fraction of the
# training records, at most USER_VALIDATION_MAX.
USER_VALIDATION_FRACTION = 0.1
USER_VALIDATION_MAX = 5_000
# `config.image_size` values that mean "not set" for the user's data: 0, and
# 224, the value configs/default.py gives every run (for ImageNet).
UNSET_IMAGE_SIZES = (0, 224)

Normalization = tuple[tuple[float, ...], tuple[float, ...]]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the training program needs to know about a dataset.

  Attributes:
    name: the name used in configs (`config.dataset`).
    tfds_name: the tfds builder name it is read from; `None` for data held in
      `arrays`.
    num_classes: number of labels.
    image_shape: `(H, W, C)` of every image, or `None` when sizes vary.
    split_sizes: nominal number of examples per split (the published sizes;
      the truth is the prepared dataset's, see `num_examples`).
    test_split: the split used as the held-out test set.
    validation_size: default number of training examples held out as the
      validation set (the last ones of the 'train' split, see
      `ec2t_jax.training.input_pipeline.split_indices`).
    embedded: shipped inside this package (built locally, no download).
    normalization: per-channel `(mean, std)` of pixel values scaled to
      [0, 1]; `None`: computed from the training records.
    recipe: the per-example transforms of
      `ec2t_jax.training.input_pipeline.preprocess_ops`: 'none', 'cifar'
      (crop, flip, colour jitter, Cutout), 'imagenet' (random-resized crop /
      central crop) or 'resize' (every image resized to `image_size`).
    channels: image channels (for the input shape when `image_shape` is None).
    class_names: the label names, when known.
    arrays: `{split: (images uint8 (N, H, W, C), labels int64 (N,))}` for data
      held in memory; `None` for tfds datasets.
    version: the prepared tfds dataset's version (`tfds:` data), else ''.
  """

  name: str
  tfds_name: str | None
  num_classes: int
  image_shape: tuple[int, int, int] | None
  split_sizes: dict[str, int]
  test_split: str
  validation_size: int
  embedded: bool = False
  normalization: Normalization | None = None
  recipe: str = 'none'
  channels: int = 3
  class_names: tuple[str, ...] | None = None
  arrays: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = dataclasses.field(
    default=None, compare=False, repr=False
  )
  version: str = ''


# A factory makes the spec of `prefix:ARGUMENT`: `factory(argument, data_dir=...,
# image_size=...) -> DatasetSpec` (see `register`).
DatasetFactory = Callable[..., DatasetSpec]

# The registry, filled by `register` (the built-in datasets in `builtin.py`).
DATASETS: dict[str, DatasetSpec] = {}
_FACTORIES: dict[str, tuple[DatasetFactory, str]] = {}


def register(
  name: str,
  spec_or_factory: DatasetSpec | DatasetFactory,
  *,
  usage: str | None = None,
  replace: bool = False,
) -> None:
  """Adds a dataset, or a `name:ARGUMENT` form of datasets, to the registry.

  A `DatasetSpec` is registered under its own name (`config.dataset=name`). A
  factory is registered as the prefix of a form: `config.dataset='name:ARG'`
  calls `factory('ARG', data_dir=<tfds data dir>, image_size=<int or None>)`,
  which returns the `DatasetSpec` of that data (with `arrays` for data held in
  memory, else a `tfds_name`) or raises a ValueError naming the problem.
  `image_size` is `config.image_size` when it is set (see
  `explicit_image_size`), else None.

  Args:
    name: the dataset's name, or the form's prefix (no ':').
    spec_or_factory: a `DatasetSpec` whose `name` is `name`, or a factory.
    usage: how the form is written in error messages, e.g. 'npz:/path/data.npz'
      (default 'name:ARGUMENT'); factories only.
    replace: allow replacing an existing registration.

  Raises:
    ValueError: a bad name, a spec of another name, or a taken name without `replace`.

  Example:
    >>> register('digits', dataclasses.replace(get_spec('mnist'), name='digits'))
    >>> register('csv', make_csv_spec, usage='csv:/path/images.csv')
  """
  if not isinstance(name, str) or not re.fullmatch(r'[A-Za-z0-9_][A-Za-z0-9_.-]*', name):
    raise ValueError(f'dataset names are letters, digits, _ . -; got {name!r}')
  if not replace and (name in DATASETS or name in _FACTORIES):
    raise ValueError(f'dataset {name!r} is registered already; pass replace=True to replace it')
  DATASETS.pop(name, None)
  _FACTORIES.pop(name, None)
  if isinstance(spec_or_factory, DatasetSpec):
    if spec_or_factory.name != name:
      raise ValueError(f'the spec is named {spec_or_factory.name!r}, not {name!r}')
    DATASETS[name] = spec_or_factory
  elif callable(spec_or_factory):
    _FACTORIES[name] = (spec_or_factory, usage or f'{name}:ARGUMENT')
  else:
    raise ValueError(f'need a DatasetSpec or a factory, got {type(spec_or_factory).__name__}')


def valid_forms() -> list[str]:
  """The forms `config.dataset` can take: registered names, then the `prefix:` forms."""
  return sorted(DATASETS) + [usage for _, usage in _FACTORIES.values()]


def get_spec(
  name: str | DatasetSpec,
  *,
  data_dir: str | os.PathLike | None = None,
  image_size: int | None = None,
) -> DatasetSpec:
  """Returns the `DatasetSpec` of `name`: a registered name, or a `prefix:ARGUMENT` form.

  For the user's data this reads it (`npz:`, `folder:`: the whole data,
  cached while the files are unchanged; `tfds:`: the builder's info) and
  refuses bad data.

  Args:
    name: e.g. 'mnist', 'tfds:fashion_mnist', 'npz:/data/d.npz',
      'folder:/data/images'; a `DatasetSpec` is returned as it is.
    data_dir: tfds data dir (see `default_data_dir`).
    image_size: the side that images of mixed sizes are resized to (None: refuse them).

  Returns:
    The spec.

  Raises:
    ValueError: an unknown name (the message lists the valid forms), or bad data.
    DatasetNotPreparedError: a `tfds:` dataset is not prepared.

  Example:
    >>> get_spec('mnist').num_classes
    10
  """
  if isinstance(name, DatasetSpec):
    return name
  if isinstance(name, str) and name in DATASETS:
    return DATASETS[name]
  prefix, colon, argument = name.partition(':') if isinstance(name, str) else ('', '', '')
  if colon and prefix in _FACTORIES:
    if not argument.strip():
      raise ValueError(f'dataset {name!r} lacks its argument; write it as {_FACTORIES[prefix][1]}')
    factory = _FACTORIES[prefix][0]
    return factory(argument, data_dir=default_data_dir(data_dir), image_size=image_size)
  raise ValueError(f'unknown dataset {name!r}; valid forms: {", ".join(valid_forms())}')


def explicit_image_size(config) -> int | None:
  """`config.image_size` when it is set for the user's data, else None.

  0 and 224 (the ImageNet size that configs/default.py gives every run) read
  as "not set".
  """
  size = config.get('image_size')
  return None if not size or size in UNSET_IMAGE_SIZES else int(size)


def spec_for_config(config) -> DatasetSpec:
  """The spec of `config.dataset`, read with the config's data dir and image size.

  Also checks that an explicit `config.num_classes` covers the labels of the
  user's data.

  Raises:
    ValueError: unknown dataset, bad data, or too few classes.
    DatasetNotPreparedError: a `tfds:` dataset is not prepared.

  Example:
    >>> spec_for_config(ml_collections.ConfigDict({'dataset': 'mnist', 'data_dir': ''}))
  """
  spec = get_spec(
    config.dataset, data_dir=config.get('data_dir') or None, image_size=explicit_image_size(config)
  )
  wanted = config.get('num_classes') or 0
  if spec.normalization is None and 0 < wanted < spec.num_classes:
    raise ValueError(
      f'config.num_classes={wanted} is too small: dataset {spec.name!r} holds labels up to '
      f"{spec.num_classes - 1}; set --config.num_classes=0 (the data's) or >= {spec.num_classes}"
    )
  return spec


def classes_and_shape(config) -> tuple[int, tuple[int, ...]]:
  """`(num_classes, image_shape)` of a run: the config's settings, else the dataset's.

  `config.num_classes` (0 = the dataset's), `config.image_shape` if present,
  else the dataset's fixed image shape, else square `config.image_size`
  images (ImageNet, and tfds data whose images vary in size).

  Example:
    >>> classes_and_shape(configs.mnist.get_config())
    (10, (28, 28, 1))
  """
  spec = spec_for_config(config)
  num_classes = config.get('num_classes') or spec.num_classes
  image_shape = (
    config.get('image_shape') or spec.image_shape or (config.image_size,) * 2 + (spec.channels,)
  )
  return int(num_classes), tuple(image_shape)


def default_data_dir(data_dir: str | os.PathLike | None = None) -> str:
  """Resolves the tfds data dir: `data_dir`, else `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`."""
  if data_dir is None:
    data_dir = os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  return os.path.expanduser(os.fspath(data_dir))


def _check_split(spec: DatasetSpec, split: str) -> None:
  """Checks the split's base name; tfds slicing (`'train[:1000]'`) is allowed."""
  if not isinstance(split, str):
    raise ValueError(f'split must be a string, got {split!r}')
  base = re.split(r'[\[+]', split, maxsplit=1)[0].strip()
  if base not in spec.split_sizes:
    raise ValueError(
      f'unknown split {split!r} for dataset {spec.name!r}; valid splits: '
      f'{sorted(spec.split_sizes)} (optionally sliced, e.g. "train[:1000]")'
    )


# ----------------------------------------------------------------------------
# Rules common to the user's data: tfds:NAME, npz:/path/data.npz, folder:/path.
# ----------------------------------------------------------------------------

_RESIZE_HINT = (
  'set --config.image_size=N to resize every image to NxN (N other than 224, the default, '
  'which reads as unset)'
)


def user_validation_size(num_train: int) -> int:
  """The default validation size of the user's data: 10 % of `num_train`, at most 5,000.

  Example:
    >>> user_validation_size(1200), user_validation_size(600_000)
    (120, 5000)
  """
  return min(USER_VALIDATION_MAX, int(num_train * USER_VALIDATION_FRACTION))


def _check_fixed_size(name: str, shape: tuple[int, ...], image_size: int | None) -> None:
  if image_size is not None and tuple(shape[:2]) != (image_size, image_size):
    raise ValueError(
      f'dataset {name!r} has images of one size, {shape[0]}x{shape[1]}; config.image_size='
      f'{image_size} resizes only data of mixed sizes: set --config.image_size=0'
    )
