"""Datasets by name: the embedded MNIST and the stock tfds image datasets.

Every dataset is read through `tfds.data_source`, which gives a random-access
source (`len(source)`, `source[i] -> {'image': uint8 HWC, 'label': int}`) for
the grain pipelines of `ec2t_jax.training.input_pipeline`. Nothing here needs
TensorFlow or the network:

* `mnist` is the full MNIST (60,000 train / 10,000 test) shipped inside this
  package as `ec2t_jax/data/mnist.npz` (made by `tools/make_embedded_mnist.py`,
  checked by sha256 on load). On first use it is written as the local tfds
  dataset `ec2t_mnist` in `array_record` format into the tfds data dir, then
  read like any other tfds dataset. Its records keep MNIST's original order
  (the builder disables tfds' shuffling), so "the last 5,000 training
  examples" is a fixed, reproducible validation set.
* `cifar10`, `cifar100` and `imagenet2012` are the stock tfds datasets. They
  must have been prepared once in `array_record` format (that one step needs
  TensorFlow, e.g. in a separate environment); `get_data_source` raises
  `DatasetNotPreparedError` with the exact command otherwise.

The data dir is, in order: the `data_dir` argument, the environment variable
`TFDS_DATA_DIR`, `~/tensorflow_datasets`.

Example:
  >>> source = get_data_source('mnist', 'train')
  >>> len(source), source[0]['image'].shape
  (60000, (28, 28, 1))
"""

import dataclasses
import functools
import hashlib
import io
import os
import re

import importlib_resources
import numpy as np
import tensorflow_datasets as tfds

EMBEDDED_MNIST_RESOURCE = 'data/mnist.npz'
EMBEDDED_MNIST_SHA256 = 'e90be2fc7426c5159b112ae4388a05d20557c49133165671e151c90c9b5c0077'
MNIST_TRAIN_LABEL_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
MNIST_TEST_LABEL_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)
MNIST_TFDS_NAME = 'ec2t_mnist'


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the training program needs to know about a dataset.

  Attributes:
    name: the name used in configs (`config.dataset`).
    tfds_name: the tfds builder name it is read from.
    num_classes: number of labels.
    image_shape: `(H, W, C)` of every image, or `None` when sizes vary.
    split_sizes: nominal number of examples per split (the published sizes;
      the truth is the prepared dataset's, see `num_examples`).
    test_split: the split used as the held-out test set.
    validation_size: default number of training examples held out as the
      validation set (the last ones of the 'train' split, see
      `ec2t_jax.training.input_pipeline.split_indices`).
    embedded: shipped inside this package (built locally, no download).
  """

  name: str
  tfds_name: str
  num_classes: int
  image_shape: tuple[int, int, int] | None
  split_sizes: dict[str, int]
  test_split: str
  validation_size: int
  embedded: bool = False


DATASETS: dict[str, DatasetSpec] = {
  'mnist': DatasetSpec(
    name='mnist',
    tfds_name=MNIST_TFDS_NAME,
    num_classes=10,
    image_shape=(28, 28, 1),
    split_sizes={'train': 60_000, 'test': 10_000},
    test_split='test',
    validation_size=5_000,
    embedded=True,
  ),
  'cifar10': DatasetSpec(
    name='cifar10',
    tfds_name='cifar10',
    num_classes=10,
    image_shape=(32, 32, 3),
    split_sizes={'train': 50_000, 'test': 10_000},
    test_split='test',
    validation_size=5_000,
  ),
  'cifar100': DatasetSpec(
    name='cifar100',
    tfds_name='cifar100',
    num_classes=100,
    image_shape=(32, 32, 3),
    split_sizes={'train': 50_000, 'test': 10_000},
    test_split='test',
    validation_size=5_000,
  ),
  'imagenet2012': DatasetSpec(
    name='imagenet2012',
    tfds_name='imagenet2012',
    num_classes=1000,
    image_shape=None,
    split_sizes={'train': 1_281_167, 'validation': 50_000},
    test_split='validation',
    validation_size=10_000,
  ),
}


class DatasetNotPreparedError(FileNotFoundError):
  """A stock tfds dataset has not been prepared (in array_record format) yet."""


def get_spec(name: str) -> DatasetSpec:
  """Returns the `DatasetSpec` registered under `name`.

  Raises:
    ValueError: if `name` is not a registered dataset; the message lists them.
  """
  try:
    return DATASETS[name]
  except KeyError:
    raise ValueError(f'unknown dataset {name!r}; valid names: {sorted(DATASETS)}') from None


def classes_and_shape(config) -> tuple[int, tuple[int, ...]]:
  """`(num_classes, image_shape)` of a run: the config's settings, else the dataset's.

  `config.num_classes` (0 = the dataset's), `config.image_shape` if present,
  else the dataset's fixed image shape, else square `config.image_size` RGB
  images (ImageNet, whose images vary in size).
  """
  spec = get_spec(config.dataset)
  num_classes = config.get('num_classes') or spec.num_classes
  image_shape = config.get('image_shape') or spec.image_shape or (config.image_size,) * 2 + (3,)
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
  """Loads the MNIST arrays shipped in `ec2t_jax/data/mnist.npz`.

  The file's sha256 is checked against `EMBEDDED_MNIST_SHA256`. Arrays are
  cached and read-only.

  Returns:
    `{'train': (images, labels), 'test': (images, labels)}` with images uint8
    `(N, 28, 28)` (pixel values 0..255) and labels uint8 `(N,)`;
    N = 60,000 and 10,000.

  Raises:
    ValueError: if the file's hash does not match (corrupt or replaced file).
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


class Ec2tMnist(tfds.core.GeneratorBasedBuilder):
  """tfds builder of the embedded MNIST (no download, no TensorFlow).

  Images are stored as raw zlib-compressed uint8 tensors rather than PNG:
  the records decode to exactly what the stock tfds `mnist` gives (uint8
  `(28, 28, 1)`, int64 label) at about half the cost per read, because
  decoding a PNG with PIL dominates the reading time of such small images.
  """

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


def prepare_embedded_mnist(data_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
  """Writes the embedded MNIST as tfds dataset `ec2t_mnist` unless already there.

  Runs once per data dir (70,000 records, 21 MB in `array_record`).
  Safe when several processes share the data dir: if a concurrent build
  wins the race, its result is used.

  Args:
    data_dir: tfds data dir (see `default_data_dir`).

  Returns:
    The prepared builder.
  """
  data_dir = default_data_dir(data_dir)
  builder = Ec2tMnist(data_dir=data_dir, file_format='array_record')
  if not builder.is_prepared():
    try:
      builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
      )
    except Exception:
      # Another process may have moved its finished copy into place first.
      if not Ec2tMnist(data_dir=data_dir).is_prepared():
        raise
  return builder


# ----------------------------------------------------------------------------
# Data sources by name.
# ----------------------------------------------------------------------------


def prepare_command(name: str, data_dir: str | os.PathLike | None = None) -> str:
  """The one-time shell command that prepares stock dataset `name` for `get_data_source`."""
  spec = get_spec(name)
  data_dir = default_data_dir(data_dir)
  command = f'tfds build {spec.tfds_name} --file_format=array_record --data_dir={data_dir}'
  if spec.tfds_name == 'imagenet2012':
    command += f' --manual_dir={os.path.join(data_dir, "downloads", "manual")}'
  return command


def _not_prepared_message(spec: DatasetSpec, data_dir: str) -> str:
  lines = [
    f'dataset {spec.name!r} (tfds {spec.tfds_name!r}) is not prepared in array_record '
    f'format under {data_dir}. Prepare it once (needs `pip install tensorflow '
    f'tensorflow-datasets`, e.g. in a separate environment) with:',
    f'  {prepare_command(spec.name, data_dir)}',
  ]
  if spec.tfds_name == 'imagenet2012':
    lines.append(
      'ImageNet is not downloadable: first place ILSVRC2012_img_train.tar and '
      f'ILSVRC2012_img_val.tar in {os.path.join(data_dir, "downloads", "manual")}.'
    )
  lines.append('Or pass data_dir=... / set TFDS_DATA_DIR to where it is prepared.')
  return '\n'.join(lines)


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
    for start in range(0, n, chunk_size):
      keys = list(range(start, min(start + chunk_size, n)))
      if hasattr(source, '__getitems__'):
        records = source.__getitems__(keys)
      else:
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
  name: str,
  split: str,
  *,
  data_dir: str | os.PathLike | None = None,
  in_memory: bool = False,
):
  """Returns a random-access source of dataset `name`'s `split`.

  `mnist` is built from the embedded copy on first use (no network). Stock
  datasets are opened with `tfds.data_source(..., download=False)`.

  Args:
    name: one of `DATASETS` ('mnist', 'cifar10', 'cifar100', 'imagenet2012').
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
    DatasetNotPreparedError: a stock dataset is not prepared in array_record
      format; the message gives the `tfds build` command.

  Example:
    >>> train = get_data_source('mnist', 'train', data_dir='/tmp/tfds')
  """
  spec = get_spec(name)
  _check_split(spec, split)
  if in_memory and spec.image_shape is None:
    raise ValueError(f'dataset {name!r} has images of varying size; in_memory must be False')
  if in_memory and spec.embedded and split in ('train', 'test'):
    # The embedded arrays are the dataset's records in the same order: no tfds read needed.
    images, labels = load_embedded_mnist()[split]
    return InMemorySource(images.reshape(-1, 28, 28, 1), labels, name=f'{name}:{split}')
  source = _open(spec, split, default_data_dir(data_dir))
  if in_memory:
    return InMemorySource.from_source(source, name=f'{name}:{split}')
  return source


def _open(spec: DatasetSpec, split: str, data_dir: str):
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


def _sliced_size(split: str, sizes: dict[str, int]) -> int:
  """Size of a tfds split spec ('train', 'train[:10%]', 'a+b') from the full split sizes."""
  infos = {
    name: tfds.core.SplitInfo(name=name, shard_lengths=[n], num_bytes=0)
    for name, n in sizes.items()
  }
  total = 0
  for instruction in tfds.core.ReadInstruction.from_spec(split).to_absolute(infos):
    n = sizes[instruction.splitname]
    stop = n if instruction.to is None else instruction.to
    total += max(0, stop - (instruction.from_ or 0))
  return total


def num_examples(
  name: str,
  split: str,
  *,
  fallback: int | None = None,
  data_dir: str | os.PathLike | None = None,
) -> int:
  """Number of examples of `name`'s `split`.

  Order of precedence: the embedded MNIST's true sizes; the prepared tfds
  dataset's `info.splits`; `fallback`. `info.splits` is empty when the
  dataset is not prepared and under `tfds.testing.mock_data`, where the
  fallback (a config value equal to the mock's `num_examples`) is used.

  Args:
    name: a registered dataset name.
    split: a split name, optionally sliced ('train[:1000]').
    fallback: the size to use when tfds does not know it.
    data_dir: tfds data dir (see `default_data_dir`).

  Returns:
    The number of examples.

  Raises:
    ValueError: unknown dataset or split, or unknown size and no fallback.
  """
  spec = get_spec(name)
  _check_split(spec, split)
  if spec.embedded:
    return _sliced_size(split, spec.split_sizes)
  try:
    builder = tfds.builder(spec.tfds_name, data_dir=default_data_dir(data_dir))
    size = builder.info.splits[split].num_examples
  except (KeyError, ValueError):
    size = None
  if size:
    return int(size)
  if fallback is not None:
    return int(fallback)
  raise ValueError(
    f'the size of {name!r} split {split!r} is unknown to tfds (not prepared, or '
    'mocked); pass fallback=<number of examples>'
  )
