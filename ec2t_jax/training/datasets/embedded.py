"""The embedded MNIST: its numpy arrays, and its tfds builder `ec2t_mnist`.

The full MNIST (60,000 train / 10,000 test) ships inside this package as
`ec2t_jax/data/mnist.npz` (made by `tools/make_embedded_mnist.py`, checked by
sha256 on load); `load_embedded_mnist()` gives its arrays without TensorFlow
Datasets, and `prepare_embedded_mnist` writes it once as the local tfds
dataset `ec2t_mnist` in `array_record` format.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from typing import TYPE_CHECKING

import importlib_resources
import numpy as np

from ec2t_jax.training.datasets.registry import default_data_dir
from ec2t_jax.training.datasets.tfds_source import _tfds

if TYPE_CHECKING:
  import tensorflow_datasets as tfds

EMBEDDED_MNIST_RESOURCE = 'data/mnist.npz'
EMBEDDED_MNIST_SHA256 = 'e90be2fc7426c5159b112ae4388a05d20557c49133165671e151c90c9b5c0077'
MNIST_TRAIN_LABEL_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
MNIST_TEST_LABEL_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)
MNIST_TFDS_NAME = 'ec2t_mnist'


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

    # The module the class was defined in before `datasets` became a package: tfds
    # records it (dataset_info.json's moduleName), and `datasets.Ec2tMnist` resolves.
    __module__ = 'ec2t_jax.training.datasets'
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
