"""Tests of ec2t_jax.training.datasets: the embedded MNIST, its tfds builder, the registry."""

import hashlib
import os

import importlib_resources
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ec2t_jax.training import datasets
from ec2t_jax.training.datasets import embedded

MOCK = tfds.testing.MockPolicy.USE_CODE


@pytest.fixture(scope='module')
def mnist_data_dir(tmp_path_factory):
  """A data dir with the embedded MNIST prepared once for this module (~20 s)."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  datasets.prepare_embedded_mnist(data_dir)
  return data_dir


def test_embedded_mnist_file_hash():
  raw = (importlib_resources.files('ec2t_jax') / 'data' / 'mnist.npz').read_bytes()
  assert hashlib.sha256(raw).hexdigest() == datasets.EMBEDDED_MNIST_SHA256
  assert 10e6 < len(raw) < 16e6


def test_embedded_mnist_arrays():
  data = datasets.load_embedded_mnist()
  assert set(data) == {'train', 'test'}
  for split, n, counts in (
    ('train', 60_000, [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]),
    ('test', 10_000, list(datasets.MNIST_TEST_LABEL_COUNTS)),
  ):
    images, labels = data[split]
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == counts
    assert images.min() == 0 and images.max() == 255
    assert not images.flags.writeable
  # MNIST's well-known first labels, in the original order.
  assert data['train'][1][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
  assert data['test'][1][:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_embedded_mnist_hash_mismatch_is_an_error(monkeypatch):
  # `load_embedded_mnist` reads the constant of the module that defines it.
  monkeypatch.setattr(embedded, 'EMBEDDED_MNIST_SHA256', '0' * 64)
  datasets.load_embedded_mnist.cache_clear()
  try:
    with pytest.raises(ValueError, match='sha256'):
      datasets.load_embedded_mnist()
  finally:
    datasets.load_embedded_mnist.cache_clear()


def test_builder_prepares_and_data_source_reads(mnist_data_dir):
  version_dir = os.path.join(mnist_data_dir, 'ec2t_mnist', '1.0.0')
  files = sorted(os.listdir(version_dir))
  assert any(f.startswith('ec2t_mnist-train.array_record') for f in files), files
  arrays = datasets.load_embedded_mnist()
  for split, n in (('train', 60_000), ('test', 10_000)):
    source = datasets.get_data_source('mnist', split, data_dir=mnist_data_dir)
    assert len(source) == n
    images, labels = arrays[split]
    # Original order is kept (tfds shuffling disabled).
    for i in (0, 1, n // 2, n - 1):
      record = source[i]
      assert record['image'].shape == (28, 28, 1) and record['image'].dtype == np.uint8
      np.testing.assert_array_equal(record['image'][..., 0], images[i])
      assert int(record['label']) == int(labels[i])
  builder = tfds.builder('ec2t_mnist', data_dir=mnist_data_dir)
  assert builder.info.splits['train'].num_examples == 60_000
  assert builder.info.features['label'].num_classes == 10


def test_prepare_is_idempotent(mnist_data_dir):
  path = os.path.join(mnist_data_dir, 'ec2t_mnist', '1.0.0', 'dataset_info.json')
  before = os.stat(path).st_mtime_ns
  datasets.prepare_embedded_mnist(mnist_data_dir)
  assert os.stat(path).st_mtime_ns == before


def test_sliced_split_and_in_memory(mnist_data_dir):
  source = datasets.get_data_source('mnist', 'test[-1000:]', data_dir=mnist_data_dir)
  assert len(source) == 1000
  memory = datasets.get_data_source(
    'mnist', 'test[-1000:]', data_dir=mnist_data_dir, in_memory=True
  )
  assert isinstance(memory, datasets.InMemorySource)
  images, labels = datasets.load_embedded_mnist()['test']
  np.testing.assert_array_equal(memory.images[..., 0], images[-1000:])
  np.testing.assert_array_equal(memory.labels, labels[-1000:])
  assert memory[3]['image'].shape == (28, 28, 1)
  assert repr(memory) == 'InMemorySource(name=mnist:test[-1000:], shape=(1000, 28, 28, 1))'


def test_data_dir_resolution(monkeypatch, tmp_path):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path))
  assert datasets.default_data_dir() == str(tmp_path)
  assert datasets.default_data_dir('/x/y') == '/x/y'
  monkeypatch.delenv('TFDS_DATA_DIR')
  assert datasets.default_data_dir() == os.path.expanduser('~/tensorflow_datasets')


@pytest.mark.parametrize('name', ['cifar10', 'cifar100', 'imagenet2012'])
def test_missing_stock_dataset_names_the_build_command(name, tmp_path):
  split = datasets.DATASETS[name].test_split
  with pytest.raises(datasets.DatasetNotPreparedError) as info:
    datasets.get_data_source(name, split, data_dir=str(tmp_path))
  assert isinstance(info.value, FileNotFoundError)
  message = str(info.value)
  assert f'tfds build {name} --file_format=array_record --data_dir={tmp_path}' in message
  if name == 'imagenet2012':
    assert f'--manual_dir={tmp_path}/downloads/manual' in message
    assert 'ILSVRC2012_img_train.tar' in message


def test_unknown_names_list_the_valid_ones():
  with pytest.raises(ValueError, match=r"unknown dataset 'svhn'.*cifar10.*mnist"):
    datasets.get_data_source('svhn', 'train')
  with pytest.raises(ValueError, match=r"unknown split 'valid'.*\['test', 'train'\]"):
    datasets.get_data_source('mnist', 'valid')
  with pytest.raises(ValueError, match='unknown dataset'):
    datasets.num_examples('imagenet', 'train')
  with pytest.raises(ValueError, match='varying size'):
    datasets.get_data_source('imagenet2012', 'train', in_memory=True)


def test_num_examples(tmp_path):
  assert datasets.num_examples('mnist', 'train') == 60_000
  assert datasets.num_examples('mnist', 'test') == 10_000
  assert datasets.num_examples('mnist', 'train[:10%]') == 6_000
  assert datasets.num_examples('mnist', 'train[-5000:]') == 5_000
  # Not prepared: tfds does not know the size; the config's fallback is used.
  assert datasets.num_examples('cifar10', 'train', data_dir=str(tmp_path), fallback=123) == 123
  with pytest.raises(ValueError, match='fallback'):
    datasets.num_examples('cifar10', 'train', data_dir=str(tmp_path))


def test_stock_datasets_under_mock_data():
  with tfds.testing.mock_data(num_examples=12, policy=MOCK):
    source = datasets.get_data_source('cifar100', 'train')
    assert len(source) == 12
    record = source[5]
    assert record['image'].shape == (32, 32, 3) and record['image'].dtype == np.uint8
    assert 0 <= int(record['label']) < 100
    # info.splits is empty under mock_data: the fallback gives the size.
    assert datasets.num_examples('cifar100', 'train', fallback=12) == 12
    imagenet = datasets.get_data_source('imagenet2012', 'validation')
    assert imagenet[0]['image'].ndim == 3


def test_registry_is_consistent():
  for name, spec in datasets.DATASETS.items():
    assert spec.name == name
    assert spec.test_split in spec.split_sizes
    assert 0 < spec.validation_size < spec.split_sizes['train']
  assert datasets.get_spec('mnist').embedded
  for name in ('mnist', 'cifar10', 'cifar100', 'imagenet2012'):
    spec = datasets.get_spec(name)
    mean, std = spec.normalization
    channels = spec.image_shape[-1] if spec.image_shape else spec.channels
    assert len(mean) == len(std) == channels
  assert datasets.valid_forms()[4:] == ['tfds:NAME', 'npz:/path/data.npz', 'folder:/path/to/images']
