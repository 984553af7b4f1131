"""Datasets by name: the built-in four, and the user's own data (`tfds:`, `npz:`, `folder:`).

`config.dataset` takes one of these forms:

* `mnist`: the full MNIST (60,000 train / 10,000 test) shipped inside this
  package as `ec2t_jax/data/mnist.npz` (made by `tools/make_embedded_mnist.py`,
  checked by sha256 on load). `load_embedded_mnist()` gives its numpy arrays
  without TensorFlow Datasets. For the tfds path it is written once as the
  local tfds dataset `ec2t_mnist` in `array_record` format into the tfds data
  dir. Its records keep MNIST's original order (the builder disables tfds'
  shuffling), so "the last 5,000 training examples" is a fixed, reproducible
  validation set.
* `cifar10`, `cifar100` and `imagenet2012`: the stock tfds datasets. They must
  have been prepared once in `array_record` format (that one step needs
  TensorFlow, e.g. in a separate environment); `get_data_source` raises
  `DatasetNotPreparedError` with the exact command otherwise.
* `tfds:NAME` (e.g. `tfds:fashion_mnist`, `tfds:imagenette/160px`): any tfds
  image-classification dataset (features 'image' and a `ClassLabel` 'label')
  prepared in `array_record` format in the data dir. Classes, image shape and
  splits come from the builder's info; the test split is 'test', else
  'validation'. Images of varying size need `config.image_size` (each image is
  then resized to a square of that side).
* `npz:/path/data.npz`: arrays `x_train`, `y_train`, `x_test`, `y_test`;
  images uint8 `(N, H, W, C)` or `(N, H, W)`, labels integer class ids
  `0..K-1` (K = the largest training label + 1). The records keep the file's
  order: the validation set is the *last* training records, so shuffle the
  arrays first if they are sorted by class.
* `folder:/path`: one sub-folder per class (class names sorted → label ids),
  images read with PIL (see `load_image_folder` for the rules: `train/` and
  `test/` sub-folders, the held-out test split, colour mode, sizes).

The user's data (`tfds:`, `npz:`, `folder:`) get no augmentation, a
normalization computed from their training records
(`ec2t_jax.training.input_pipeline.compute_normalization`) and, by default,
10 % of the training records (at most 5,000) as the validation set.

Every split is a random-access source (`len(source)`, `source[i] -> {'image':
uint8 HWC, 'label': int}`) for the grain pipelines of
`ec2t_jax.training.input_pipeline`: a tfds `ArrayRecordDataSource`, or an
`InMemorySource` of numpy arrays. Nothing here needs TensorFlow or the
network, and `tensorflow_datasets` is imported only by the functions that
read tfds datasets.

Other datasets are added with `register` (a fixed `DatasetSpec`, or a factory
for a new `prefix:ARGUMENT` form), as the built-in ones are.

The data dir is, in order: the `data_dir` argument, the environment variable
`TFDS_DATA_DIR`, `~/tensorflow_datasets`.

Example:
  >>> source = get_data_source('mnist', 'train')
  >>> len(source), source[0]['image'].shape
  (60000, (28, 28, 1))
  >>> spec = get_spec('npz:/data/shapes.npz')
  >>> spec.num_classes, spec.image_shape, spec.split_sizes
  (3, (32, 32, 3), {'train': 900, 'test': 300})
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import io
import logging
import os
import re
import zipfile
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import importlib_resources
import numpy as np

if TYPE_CHECKING:
  import tensorflow_datasets as tfds

EMBEDDED_MNIST_RESOURCE = 'data/mnist.npz'
EMBEDDED_MNIST_SHA256 = 'e90be2fc7426c5159b112ae4388a05d20557c49133165671e151c90c9b5c0077'
MNIST_TRAIN_LABEL_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
MNIST_TEST_LABEL_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)
MNIST_TFDS_NAME = 'ec2t_mnist'

# The user's data: the validation set's default size is this fraction of the
# training records, at most USER_VALIDATION_MAX.
USER_VALIDATION_FRACTION = 0.1
USER_VALIDATION_MAX = 5_000
# `config.image_size` values that mean "not set" for the user's data: 0, and
# 224, the value configs/default.py gives every run (for ImageNet).
UNSET_IMAGE_SIZES = (0, 224)
# Every `FOLDER_TEST_EVERY`-th image of a class (in file name order) is the held-out
# test split of a `folder:` dataset without a test/ sub-folder.
FOLDER_TEST_EVERY = 5
IMAGE_EXTENSIONS = (
  '.bmp',
  '.gif',
  '.jpeg',
  '.jpg',
  '.pgm',
  '.png',
  '.ppm',
  '.tif',
  '.tiff',
  '.webp',
)
# PIL modes read as one grey channel; every other mode is converted to RGB.
_GRAY_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'F')

Normalization = tuple[tuple[float, ...], tuple[float, ...]]


def _tfds():
  """`tensorflow_datasets`, imported on first use (it is not needed for in-memory data)."""
  return importlib.import_module('tensorflow_datasets')


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


# A factory makes the spec of `prefix:ARGUMENT`: `factory(argument, data_dir=...,
# image_size=...) -> DatasetSpec` (see `register`).
DatasetFactory = Callable[..., DatasetSpec]

# The registry, filled by `register` (the built-in datasets at the end of this module).
DATASETS: dict[str, DatasetSpec] = {}
_FACTORIES: dict[str, tuple[DatasetFactory, str]] = {}


class DatasetNotPreparedError(FileNotFoundError):
  """A stock tfds dataset has not been prepared (in array_record format) yet."""


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
# Embedded MNIST.
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def load_embedded_mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Loads the MNIST arrays shipped in `ec2t_jax/data/mnist.npz` (numpy only, no tfds).

  The file's sha256 is checked against `EMBEDDED_MNIST_SHA256`. Arrays are
  cached and read-only.

  Returns:
    `{'train': (images, labels), 'test': (images, labels)}` with images uint8
    `(N, 28, 28)` (pixel values 0..255) and labels uint8 `(N,)`;
    N = 60,000 and 10,000.

  Raises:
    ValueError: if the file's hash does not match (corrupt or replaced file).

  Example:
    >>> images, labels = load_embedded_mnist()['test']
    >>> images.shape, labels[:3].tolist()
    ((10000, 28, 28), [7, 2, 1])
  """
  raw = (importlib_resources.files('ec2t_jax') / EMBEDDED_MNIST_RESOURCE).read_bytes()
  digest = hashlib.sha256(raw).hexdigest()
  if digest != EMBEDDED_MNIST_SHA256:
    raise ValueError(
      f'ec2t_jax/{EMBEDDED_MNIST_RESOURCE} has sha256 {digest}, expected '
      f'{EMBEDDED_MNIST_SHA256}; regenerate it with tools/make_embedded_mnist.py'
    )
  with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
    arrays = {key: npz[key] for key in npz.files}
  out = {}
  for split in ('train', 'test'):
    images, labels = arrays[f'{split}_images'], arrays[f'{split}_labels']
    images.flags.writeable = False
    labels.flags.writeable = False
    out[split] = (images, labels)
  return out


@functools.cache
def embedded_mnist_builder_class() -> type:
  """The tfds builder class `Ec2tMnist` of the embedded MNIST (no download, no TensorFlow).

  Made on first use, so that importing this module does not import
  `tensorflow_datasets`; making it registers the tfds name `ec2t_mnist`. Also
  reachable as `datasets.Ec2tMnist`.

  Images are stored as raw zlib-compressed uint8 tensors rather than PNG:
  the records decode to exactly what the stock tfds `mnist` gives (uint8
  `(28, 28, 1)`, int64 label) at about half the cost per read, because
  decoding a PNG with PIL dominates the reading time of such small images.

  Example:
    >>> builder = embedded_mnist_builder_class()(data_dir='/tmp/tfds')
  """
  tfds = _tfds()

  class Ec2tMnist(tfds.core.GeneratorBasedBuilder):
    """tfds builder of the embedded MNIST (see `embedded_mnist_builder_class`)."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': f'Embedded MNIST, npz sha256 {EMBEDDED_MNIST_SHA256[:16]}.'}

    def _info(self) -> tfds.core.DatasetInfo:
      return tfds.core.DatasetInfo(
        builder=self,
        description=(
          'The MNIST handwritten digits (60,000 train / 10,000 test) in their '
          'original order, from the copy embedded in the ec2t_jax package.'
        ),
        features=tfds.features.FeaturesDict(
          {
            'image': tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8, encoding='zlib'),
            'label': tfds.features.ClassLabel(num_classes=10),
          }
        ),
        supervised_keys=('image', 'label'),
        homepage='http://yann.lecun.com/exdb/mnist/',
        # Keeps the original order: the held-out validation set (the last
        # training examples) is then independent of tfds' hashing.
        disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      del dl_manager  # Nothing to download.
      return {split: self._generate_examples(split) for split in ('train', 'test')}

    def _generate_examples(self, split):
      images, labels = load_embedded_mnist()[split]
      for i in range(images.shape[0]):
        yield i, {'image': images[i][..., None], 'label': int(labels[i])}

  Ec2tMnist.__qualname__ = 'Ec2tMnist'
  return Ec2tMnist


def __getattr__(name: str) -> Any:
  # `datasets.Ec2tMnist` without importing tfds at module import (PEP 562).
  if name == 'Ec2tMnist':
    return embedded_mnist_builder_class()
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def prepare_embedded_mnist(data_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
  """Writes the embedded MNIST as tfds dataset `ec2t_mnist` unless already there.

  Runs once per data dir (70,000 records, 21 MB in `array_record`).
  Safe when several processes share the data dir: if a concurrent build
  wins the race, its result is used.

  Args:
    data_dir: tfds data dir (see `default_data_dir`).

  Returns:
    The prepared builder.

  Example:
    >>> prepare_embedded_mnist('/tmp/tfds').is_prepared()
    True
  """
  tfds = _tfds()
  data_dir = default_data_dir(data_dir)
  builder_class = embedded_mnist_builder_class()
  builder = builder_class(data_dir=data_dir, file_format='array_record')
  if not builder.is_prepared():
    try:
      builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
      )
    except Exception:
      # Another process may have moved its finished copy into place first.
      if not builder_class(data_dir=data_dir).is_prepared():
        raise
  return builder


# ----------------------------------------------------------------------------
# Data sources by name.
# ----------------------------------------------------------------------------


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


class InMemorySource:
  """A split held in memory as numpy arrays: `source[i] -> {'image', 'label'}`.

  Reading a record from an `ArrayRecordDataSource` costs tens to hundreds of
  microseconds (a file read through a thread pool, then proto parsing);
  from memory it costs about one. For the small fixed-size datasets (MNIST
  47 MB, CIFAR 150 MB per process) this is the fast way to feed a GPU.
  The `repr` is stable, as grain checks it when restoring an iterator state.

  Attributes:
    images: uint8 `(N, H, W, C)`, read-only.
    labels: int64 `(N,)`, read-only.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, *, name: str = 'arrays'):
    if images.ndim != 4 or images.shape[0] != labels.shape[0]:
      raise ValueError(
        f'need images (N, H, W, C) and labels (N,), got {images.shape} and {labels.shape}'
      )
    self.images = images
    self.labels = labels.astype(np.int64, copy=False)
    self.images.flags.writeable = False
    self.labels.flags.writeable = False
    self._repr = f'InMemorySource(name={name}, shape={tuple(images.shape)})'

  @classmethod
  def from_source(cls, source, *, name: str = 'arrays', chunk_size: int = 1024):
    """Reads every record of a random-access source (fixed-size images only)."""
    n = len(source)
    images, labels = None, np.empty((n,), np.int64)
    batched = hasattr(source, '__getitems__')
    for start in range(0, n, chunk_size):
      keys = list(range(start, min(start + chunk_size, n)))
      records = None
      if batched:
        try:
          records = source.__getitems__(keys)
        except TypeError:  # tfds.testing.mock_data's sources lack a working __getitems__.
          batched = False
      if records is None:
        records = [source[k] for k in keys]
      for k, record in zip(keys, records, strict=True):
        image = np.asarray(record['image'])
        if images is None:
          images = np.empty((n,) + image.shape, image.dtype)
        if image.shape != images.shape[1:]:
          raise ValueError(
            f'record {k} has image shape {image.shape}, expected '
            f'{images.shape[1:]}: only fixed-size datasets fit in memory'
          )
        images[k] = image
        labels[k] = record['label']
    if images is None:
      raise ValueError('cannot hold an empty source in memory')
    return cls(images, labels, name=name)

  def __len__(self) -> int:
    return self.labels.shape[0]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {'image': self.images[index], 'label': self.labels[index]}

  def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
    return [self[i] for i in indices]

  def __repr__(self) -> str:
    return self._repr


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


# ----------------------------------------------------------------------------
# The user's data: tfds:NAME, npz:/path/data.npz, folder:/path.
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
  )


def _check_fixed_size(name: str, shape: tuple[int, ...], image_size: int | None) -> None:
  if image_size is not None and tuple(shape[:2]) != (image_size, image_size):
    raise ValueError(
      f'dataset {name!r} has images of one size, {shape[0]}x{shape[1]}; config.image_size='
      f'{image_size} resizes only data of mixed sizes: set --config.image_size=0'
    )


def _npz_spec(argument: str, *, data_dir: str, image_size: int | None) -> DatasetSpec:
  """The spec of `npz:/path/data.npz` (see the module docstring)."""
  del data_dir  # Not a tfds dataset.
  name = f'npz:{argument}'
  path = os.path.abspath(os.path.expanduser(argument))
  if not os.path.isfile(path):
    raise ValueError(
      f'dataset {name!r}: no such file {path!r}; give the path of a .npz file with arrays '
      'x_train, y_train, x_test, y_test'
    )
  stat = os.stat(path)
  return _npz_spec_cached(name, path, image_size, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _npz_spec_cached(name: str, path: str, image_size: int | None, *file_version) -> DatasetSpec:
  del file_version  # Only the cache's key: a rewritten file is read again.
  needed = ('x_train', 'y_train', 'x_test', 'y_test')
  if not zipfile.is_zipfile(path):
    raise ValueError(
      f'dataset {name!r}: {path!r} is not an .npz file (not a zip archive); write it with '
      'np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)'
    )
  try:
    with np.load(path, allow_pickle=False) as npz:
      found = sorted(npz.files)
      missing = [key for key in needed if key not in found]
      if missing:
        raise ValueError(
          f'dataset {name!r} lacks the arrays {missing}: the file has {found}, and needs '
          f'{list(needed)}; save it with np.savez(path, x_train=..., y_train=..., x_test=..., '
          'y_test=...)'
        )
      arrays = {key: npz[key] for key in needed}
  except ValueError as e:
    if str(e).startswith(f'dataset {name!r}'):
      raise
    raise ValueError(
      f'dataset {name!r}: cannot read {path!r} as .npz ({e}); store numeric arrays only'
    ) from None
  except Exception as e:  # noqa: BLE001 - zipfile, OSError, pickle: all mean a bad file.
    raise ValueError(
      f'dataset {name!r}: cannot read {path!r} as .npz ({type(e).__name__}: {e}); write it '
      'with np.savez'
    ) from None
  return _array_spec(
    name,
    {'train': (arrays['x_train'], arrays['y_train']), 'test': (arrays['x_test'], arrays['y_test'])},
    image_size=image_size,
  )


def _array_spec(
  name: str,
  splits: dict[str, tuple[np.ndarray, np.ndarray]],
  *,
  image_size: int | None,
  class_names: tuple[str, ...] | None = None,
) -> DatasetSpec:
  """Checks in-memory `{'train': (x, y), 'test': (x, y)}` and makes their spec."""
  checked = {}
  for split, (images, labels) in splits.items():
    x, y = f'x_{split}', f'y_{split}'
    if images.dtype != np.uint8:
      raise ValueError(
        f'dataset {name!r}: {x} has dtype {images.dtype}; images must be uint8 (0..255), e.g. '
        f'({x} * 255).round().astype(np.uint8) for values in [0, 1]'
      )
    if images.ndim not in (3, 4) or images.shape[0] == 0:
      raise ValueError(
        f'dataset {name!r}: {x} has shape {images.shape}; images must be a non-empty '
        '(N, H, W) or (N, H, W, C) array'
      )
    if labels.ndim != 1:
      raise ValueError(
        f'dataset {name!r}: {y} has shape {labels.shape}; labels must be 1-D (N,), e.g. {y}.ravel()'
      )
    if labels.dtype.kind not in 'iu':
      raise ValueError(
        f'dataset {name!r}: {y} has dtype {labels.dtype}; labels must be integer class ids '
        f'0..K-1 (e.g. {y}.astype(np.int64) if they are whole numbers)'
      )
    if labels.shape[0] != images.shape[0]:
      raise ValueError(
        f'dataset {name!r}: {x} holds {images.shape[0]} images but {y} holds '
        f'{labels.shape[0]} labels; give every image exactly one label'
      )
    if labels.min() < 0:
      i = int(np.argmin(labels))
      raise ValueError(
        f'dataset {name!r}: {y} holds the negative label {labels[i]} (index {i}); labels must '
        'be class ids 0..K-1'
      )
    images = images[..., None] if images.ndim == 3 else images
    checked[split] = (images, labels.astype(np.int64))
  (train_x, train_y), (test_x, _) = checked['train'], checked['test']
  if train_x.shape[1:] != test_x.shape[1:]:
    raise ValueError(
      f'dataset {name!r}: training images are {_hwc(train_x.shape[1:])} but test images '
      f'{_hwc(test_x.shape[1:])}; both splits need images of one shape'
    )
  num_classes = len(class_names) if class_names else int(train_y.max()) + 1
  for split, (_, labels) in checked.items():
    if labels.max() >= num_classes:
      i = int(np.argmax(labels))
      raise ValueError(
        f'dataset {name!r}: y_{split} holds the label {labels[i]} (index {i}), out of range: '
        f'the training labels make {num_classes} classes, 0..{num_classes - 1}; every label '
        'must be a class id that the training split has'
      )
  if not class_names:
    missing = sorted(set(range(num_classes)) - set(np.unique(train_y).tolist()))
    logging.info(
      'dataset %s: %d classes (the largest training label + 1)%s',
      name,
      num_classes,
      f'; class ids {missing[:10]} have no training example' if missing else '',
    )
  _check_fixed_size(name, train_x.shape[1:], image_size)
  for images, labels in checked.values():
    images.flags.writeable = False
    labels.flags.writeable = False
  return DatasetSpec(
    name=name,
    tfds_name=None,
    num_classes=num_classes,
    image_shape=tuple(int(d) for d in train_x.shape[1:]),
    split_sizes={split: int(images.shape[0]) for split, (images, _) in checked.items()},
    test_split='test',
    validation_size=user_validation_size(train_x.shape[0]),
    channels=int(train_x.shape[-1]),
    class_names=class_names,
    arrays=checked,
  )


def _hwc(shape: tuple[int, ...]) -> str:
  return 'x'.join(str(d) for d in shape)


def _list_images(directory: str) -> list[str]:
  """The image files of `directory` (by extension, not hidden), sorted by name."""
  return [
    os.path.join(directory, entry)
    for entry in sorted(os.listdir(directory))
    if not entry.startswith('.')
    and entry.lower().endswith(IMAGE_EXTENSIONS)
    and os.path.isfile(os.path.join(directory, entry))
  ]


def _class_folders(directory: str) -> list[str]:
  return sorted(
    entry
    for entry in os.listdir(directory)
    if not entry.startswith('.') and os.path.isdir(os.path.join(directory, entry))
  )


def _folder_layout(root: str, name: str) -> tuple[list[str], dict[str, list[str]], bool]:
  """`(class names, {split: [(class id, file)]...}, test held out)` of an image folder."""
  if not os.path.isdir(root):
    raise ValueError(
      f'dataset {name!r}: {root!r} is not a folder; give a folder that holds one sub-folder '
      'of images per class'
    )
  has_train, has_test = (os.path.isdir(os.path.join(root, s)) for s in ('train', 'test'))
  if has_test and not has_train:
    raise ValueError(
      f'dataset {name!r} has a test/ folder but no train/ folder; put the training images '
      f'in {os.path.join(root, "train", "<class>")}/'
    )
  train_root = os.path.join(root, 'train') if has_train else root
  classes = _class_folders(train_root)
  if not classes:
    raise ValueError(
      f'dataset {name!r}: {train_root!r} holds no class folders; it must hold one sub-folder '
      f'of images per class, e.g. {os.path.join(train_root, "cat", "001.png")}'
    )
  files = {c: _list_images(os.path.join(train_root, c)) for c in classes}
  for c in classes:
    if not files[c]:
      raise ValueError(
        f'dataset {name!r}: the class folder {os.path.join(train_root, c)!r} holds no images '
        f'({" ".join(IMAGE_EXTENSIONS)}); add images or remove the folder'
      )
  if has_test:
    test_root = os.path.join(root, 'test')
    unknown = sorted(set(_class_folders(test_root)) - set(classes))
    if unknown:
      raise ValueError(
        f'dataset {name!r}: test/ has class folders {unknown} that train/ lacks; the classes '
        f'are those of train/: {classes}'
      )
    test = {c: _list_images(os.path.join(test_root, c)) for c in _class_folders(test_root)}
    split_files = {
      'train': [(classes.index(c), f) for c in classes for f in files[c]],
      'test': [(classes.index(c), f) for c in test for f in test[c]],
    }
    if not split_files['test']:
      raise ValueError(
        f'dataset {name!r}: {test_root!r} holds no images; put test images in its class '
        'folders, or remove it to hold out a test split from the training images'
      )
    return classes, split_files, False
  every = FOLDER_TEST_EVERY
  held = {c: set(files[c][every - 1 :: every]) for c in classes}
  split_files = {
    'train': [(k, f) for k, c in enumerate(classes) for f in files[c] if f not in held[c]],
    'test': [(k, f) for k, c in enumerate(classes) for f in files[c][every - 1 :: every]],
  }
  if not split_files['test']:
    raise ValueError(
      f'dataset {name!r}: too few images to hold out a test split (every {every}th image of '
      f'each class); add a test/ folder, or at least {every} images to a class'
    )
  return classes, split_files, True


def _image_error(name: str, path: str, error: Exception) -> ValueError:
  return ValueError(
    f'dataset {name!r}: cannot read the image {path!r} ({type(error).__name__}: {error}); '
    'remove or replace the file'
  )


def load_image_folder(
  path: str | os.PathLike, *, image_size: int | None = None, name: str | None = None
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[str, ...], bool]:
  """Reads a folder of images, one sub-folder per class, into numpy arrays.

  The rules of `folder:/path` datasets:

  * classes are the sub-folders (hidden ones skipped), sorted by name; their
    position in that order is the label;
  * with `train/` (and optionally `test/`) sub-folders, the classes are those
    of `train/`, and `test/` holds the test images in folders of the same
    names (a class may lack test images);
  * without `test/`, the test split is held out deterministically: every
    fifth image (the 5th, 10th, ...) of each class in file name order;
  * images are the files with the extensions of `IMAGE_EXTENSIONS` (others
    are ignored), decoded with PIL; if every image is grey (PIL modes 1, L,
    LA, I, I;16, F) they have one channel, else all are converted to RGB
    (alpha is dropped);
  * all images must have one size, unless `image_size` is given: then every
    image is resized (bilinear, aspect ratio not kept) to
    `image_size x image_size`;
  * the training records are put in a fixed pseudo-random order (seed 0),
    so that the validation set (the last training records) mixes the
    classes; test records are in class, then file name order.

  Everything is held in memory: this is meant for small folders.

  Args:
    path: the folder.
    image_size: the side images of mixed sizes are resized to; None: refuse
      mixed sizes.
    name: the dataset's name in error messages (default 'folder:<path>').

  Returns:
    `({'train': (images, labels), 'test': (images, labels)}, class names,
    test held out)`, images uint8 `(N, H, W, C)` and labels int64 `(N,)`.

  Raises:
    ValueError: not a folder, no class folders, a class folder without
      images, an unreadable image (named), mixed sizes without
      `image_size`, too few images to hold out a test split.

  Example:
    >>> splits, classes, held_out = load_image_folder('/data/flowers', image_size=64)
    >>> splits['train'][0].shape, classes
    ((1200, 64, 64, 3), ('daisy', 'rose', 'tulip'))
  """
  root = os.path.abspath(os.path.expanduser(os.fspath(path)))
  name = name or f'folder:{path}'
  classes, split_files, held_out = _folder_layout(root, name)
  version = tuple(
    (f, s.st_mtime_ns, s.st_size)
    for files in split_files.values()
    for _, f in files
    for s in [os.stat(f)]
  )
  splits = _read_folder(name, tuple(classes), _freeze(split_files), image_size, version)
  return splits, tuple(classes), held_out


def _freeze(split_files: dict[str, list[tuple[int, str]]]) -> tuple:
  return tuple((split, tuple(files)) for split, files in split_files.items())


@functools.lru_cache(maxsize=4)
def _read_folder(name, classes, split_files, image_size, version):
  """Decodes the images of a `_folder_layout` (cached while the files are unchanged)."""
  del classes, version  # Only the cache's key.
  import PIL.Image  # noqa: PLC0415 - only image folders need PIL here.

  headers = {}
  for _, files in split_files:
    for _, path in files:
      try:
        with PIL.Image.open(path) as image:
          headers[path] = (image.mode, image.size)
      except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad file.
        raise _image_error(name, path, e) from None
  mode = 'L' if all(m in _GRAY_MODES for m, _ in headers.values()) else 'RGB'
  sizes = {}
  for path, (_, size) in headers.items():
    sizes.setdefault(size, path)
  if len(sizes) > 1 and image_size is None:
    (s1, p1), (s2, p2) = list(sizes.items())[:2]
    raise ValueError(
      f'dataset {name!r} has images of mixed sizes ({p1!r} is {s1[0]}x{s1[1]}, {p2!r} is '
      f'{s2[0]}x{s2[1]}); {_RESIZE_HINT}'
    )
  if len(sizes) == 1:
    (width, height), _ = next(iter(sizes.items()))
    _check_fixed_size(name, (height, width), image_size)
  out = {}
  for split, files in split_files:
    images = []
    for _, path in files:
      try:
        with PIL.Image.open(path) as image:
          image = image.convert(mode)
          if image_size is not None and image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), PIL.Image.Resampling.BILINEAR)
          images.append(np.asarray(image, np.uint8))
      except Exception as e:  # noqa: BLE001 - decoding errors show only here.
        raise _image_error(name, path, e) from None
    labels = np.array([label for label, _ in files], np.int64)
    images = np.stack(images)
    if images.ndim == 3:  # Grey: one channel.
      images = images[..., None]
    if split == 'train':
      order = np.random.default_rng(0).permutation(len(labels))
      images, labels = images[order], labels[order]
    out[split] = (images, labels)
  return out


def _folder_spec(argument: str, *, data_dir: str, image_size: int | None) -> DatasetSpec:
  """The spec of `folder:/path` (see `load_image_folder`)."""
  del data_dir  # Not a tfds dataset.
  name = f'folder:{argument}'
  splits, classes, held_out = load_image_folder(argument, image_size=image_size, name=name)
  spec = _array_spec(name, splits, image_size=None, class_names=classes)
  logging.info(
    '%s: %d training and %d test images of %d classes, %s%s',
    name,
    spec.split_sizes['train'],
    spec.split_sizes['test'],
    spec.num_classes,
    _hwc(spec.image_shape),
    f'; test split held out: every {FOLDER_TEST_EVERY}th image of each class' if held_out else '',
  )
  return spec


# ----------------------------------------------------------------------------
# The registry's built-in entries.
# ----------------------------------------------------------------------------

register(
  'mnist',
  DatasetSpec(
    name='mnist',
    tfds_name=MNIST_TFDS_NAME,
    num_classes=10,
    image_shape=(28, 28, 1),
    split_sizes={'train': 60_000, 'test': 10_000},
    test_split='test',
    validation_size=5_000,
    embedded=True,
    normalization=((0.1307,), (0.3081,)),
    recipe='none',
    channels=1,
  ),
)
# CIFAR-10's statistics are the original implementation's (d-becking/efficientCNNs
# normalizes with mean (125.3, 123.0, 113.9) / 255 and std (63.0, 62.1, 66.7) / 255), so
# that imported original weights see the inputs they were trained on. CIFAR-100 keeps its
# own statistics; the original normalized CIFAR-100 with CIFAR-10's, which
# `config.normalization = 'cifar10'` selects (see
# `ec2t_jax.training.input_pipeline.parse_normalization`).
CIFAR10_NORMALIZATION: Normalization = (
  (125.3 / 255, 123.0 / 255, 113.9 / 255),
  (63.0 / 255, 62.1 / 255, 66.7 / 255),
)
CIFAR100_NORMALIZATION: Normalization = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
for _name, _classes, (_mean, _std) in (
  ('cifar10', 10, CIFAR10_NORMALIZATION),
  ('cifar100', 100, CIFAR100_NORMALIZATION),
):
  register(
    _name,
    DatasetSpec(
      name=_name,
      tfds_name=_name,
      num_classes=_classes,
      image_shape=(32, 32, 3),
      split_sizes={'train': 50_000, 'test': 10_000},
      test_split='test',
      validation_size=5_000,
      normalization=(_mean, _std),
      recipe='cifar',
    ),
  )
del _name, _classes, _mean, _std
register(
  'imagenet2012',
  DatasetSpec(
    name='imagenet2012',
    tfds_name='imagenet2012',
    num_classes=1000,
    image_shape=None,
    split_sizes={'train': 1_281_167, 'validation': 50_000},
    test_split='validation',
    validation_size=10_000,
    normalization=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    recipe='imagenet',
  ),
)
register('tfds', _tfds_spec, usage='tfds:NAME')
register('npz', _npz_spec, usage='npz:/path/data.npz')
register('folder', _folder_spec, usage='folder:/path/to/images')
