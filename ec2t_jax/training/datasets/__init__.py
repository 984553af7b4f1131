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

The package's modules, each importing only those above it: `registry`
(`DatasetSpec`, `register`, `get_spec`), `tfds_source` (the `tfds:` form,
unprepared datasets), `embedded` (MNIST), `memory` (`InMemorySource`),
`sources` (`get_data_source`, `num_examples`), `arrays` (`npz:`), `folder`
(`folder:`), `builtin` (the built-in entries), `fingerprint` (what a workdir
records of its data, to refuse a resume on other data). Everything public is
re-exported here: use `datasets.X`.

Example:
  >>> source = get_data_source('mnist', 'train')
  >>> len(source), source[0]['image'].shape
  (60000, (28, 28, 1))
  >>> spec = get_spec('npz:/data/shapes.npz')
  >>> spec.num_classes, spec.image_shape, spec.split_sizes
  (3, (32, 32, 3), {'train': 900, 'test': 300})
"""

from __future__ import annotations

from typing import Any

from ec2t_jax.training.datasets.builtin import CIFAR10_NORMALIZATION, CIFAR100_NORMALIZATION
from ec2t_jax.training.datasets.embedded import (
  EMBEDDED_MNIST_RESOURCE,
  EMBEDDED_MNIST_SHA256,
  MNIST_TEST_LABEL_COUNTS,
  MNIST_TFDS_NAME,
  MNIST_TRAIN_LABEL_COUNTS,
  embedded_mnist_builder_class,
  load_embedded_mnist,
  prepare_embedded_mnist,
)
from ec2t_jax.training.datasets.fingerprint import fingerprint
from ec2t_jax.training.datasets.folder import FOLDER_TEST_EVERY, IMAGE_EXTENSIONS, load_image_folder
from ec2t_jax.training.datasets.memory import InMemorySource
from ec2t_jax.training.datasets.registry import (
  DATASETS,
  UNSET_IMAGE_SIZES,
  USER_VALIDATION_FRACTION,
  USER_VALIDATION_MAX,
  DatasetFactory,
  DatasetSpec,
  Normalization,
  classes_and_shape,
  default_data_dir,
  explicit_image_size,
  get_spec,
  register,
  spec_for_config,
  user_validation_size,
  valid_forms,
)
from ec2t_jax.training.datasets.sources import get_data_source, num_examples
from ec2t_jax.training.datasets.tfds_source import DatasetNotPreparedError, prepare_command

__all__ = [
  'CIFAR100_NORMALIZATION',
  'CIFAR10_NORMALIZATION',
  'classes_and_shape',
  'DatasetFactory',
  'DatasetNotPreparedError',
  'DATASETS',
  'DatasetSpec',
  'default_data_dir',
  'embedded_mnist_builder_class',
  'EMBEDDED_MNIST_RESOURCE',
  'EMBEDDED_MNIST_SHA256',
  'explicit_image_size',
  'fingerprint',
  'FOLDER_TEST_EVERY',
  'get_data_source',
  'get_spec',
  'IMAGE_EXTENSIONS',
  'InMemorySource',
  'load_embedded_mnist',
  'load_image_folder',
  'MNIST_TEST_LABEL_COUNTS',
  'MNIST_TFDS_NAME',
  'MNIST_TRAIN_LABEL_COUNTS',
  'Normalization',
  'num_examples',
  'prepare_command',
  'prepare_embedded_mnist',
  'register',
  'spec_for_config',
  'UNSET_IMAGE_SIZES',
  'USER_VALIDATION_FRACTION',
  'USER_VALIDATION_MAX',
  'user_validation_size',
  'valid_forms',
]


def __getattr__(name: str) -> Any:
  # `datasets.Ec2tMnist` without importing tfds at module import (PEP 562).
  if name == 'Ec2tMnist':
    return embedded_mnist_builder_class()
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
