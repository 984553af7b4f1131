"""The user's own data in main.py: `tfds:NAME`, `npz:/path/data.npz`, `folder:/path`.

Small generated data in tmp_path (never a download): end-to-end training, the
refusal of every kind of bad data, the normalization from the training records,
tfds datasets under `tfds.testing.mock_data`, and `datasets.register`.
"""

import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from ec2t_jax.training import datasets, input_pipeline, train
from ec2t_jax.training import parse as parse_lib
from ec2t_jax.training.datasets import registry

MOCK = tfds.testing.MockPolicy.USE_CODE
CLASSES = ('circle', 'square', 'stripe')


def _data_run(config):
  """The parsed run of a config whose data alone is tested (no model, any batch size)."""
  return parse_lib.parse(config, check_model=False, check_devices=False)


def make_images(n, size=28, channels=1, seed=0, num_classes=3):
  """`n` uint8 images whose class (label `i % num_classes`) is a bright patch's position."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % num_classes
  images = rng.integers(0, 60, (n, size, size, channels), dtype=np.uint8)
  side = size // num_classes
  for i, label in enumerate(labels):
    images[i, 2 : 2 + side, label * side : (label + 1) * side] = 220
  return images, labels.astype(np.int64)


def write_npz(path, n_train=200, n_test=60, size=28, channels=1, **replace):
  """An npz dataset; `replace` overrides or adds arrays (a value of None drops the key)."""
  x_train, y_train = make_images(n_train, size, channels, seed=0)
  x_test, y_test = make_images(n_test, size, channels, seed=1)
  arrays = {'x_train': x_train, 'y_train': y_train, 'x_test': x_test, 'y_test': y_test}
  arrays.update(replace)
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return str(path)


def write_folder(root, per_class=10, size=28, mode='RGB', classes=CLASSES, sizes=None):
  """`root/<class>/<i>.png` images; `sizes` (a list) gives each image's (width, height)."""
  for k, name in enumerate(classes):
    os.makedirs(root / name, exist_ok=True)
    images, _ = make_images(per_class, size, 3, seed=k)
    for i in range(per_class):
      image = PIL.Image.fromarray(images[i]).convert(mode)
      if sizes:
        image = image.resize(sizes[(k * per_class + i) % len(sizes)])
      image.save(root / name / f'{i:03d}.png')
  return str(root)


def tiny(tiny_mnist, dataset, **overrides):
  """The tiny MNIST config (LeNet-5, 3 steps per epoch, one epoch per stage) on `dataset`."""
  return tiny_mnist(dataset=dataset, **overrides)


# ----------------------------------------------------------------------------
# End to end.
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_npz_trains_end_to_end(tmp_path, tiny_mnist):
  path = write_npz(tmp_path / 'data.npz')
  workdir = tmp_path / 'run'
  summary = train.train_and_evaluate(tiny(tiny_mnist, f'npz:{path}'), str(workdir))
  assert summary['dataset'] == f'npz:{path}'
  assert summary['steps'] == 9
  # LeNet-5 with a 3-way classifier: 61,706 - 7 * 85 parameters of the 10-way one.
  assert summary['num_params'] == 61_706 - 7 * 85
  assert 0.0 <= summary['test_accuracy'] <= 1.0
  assert summary['val_accuracy'] is not None  # 20 of the 200 training records
  assert (workdir / 'summary.json').exists()


@pytest.mark.slow
def test_folder_trains_end_to_end(tmp_path, tiny_mnist):
  root = write_folder(tmp_path / 'images', per_class=20)  # 28x28 RGB PNGs, test held out
  config = tiny(tiny_mnist, f'folder:{root}', batch_size=8)  # 44 training records: 5 batches
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['steps'] == 9
  assert summary['num_params'] == 61_706 - 7 * 85 + 2 * 150  # conv1 takes 3 channels
  assert 0.0 <= summary['test_accuracy'] <= 1.0


def test_open_data_of_a_folder(tmp_path, tiny_mnist):
  root = write_folder(tmp_path / 'images', per_class=20)
  data = train.open_data(_data_run(tiny(tiny_mnist, f'folder:{root}')))
  assert data.image_shape == (28, 28, 3) and data.num_classes == 3
  # 16 training images per class (every 5th is held out for the test), 10 % for validation.
  assert len(data.train_source) == 48 and len(data.test_source) == 12
  assert len(data.val_indices) == 4 and len(data.train_indices) == 44
  batch = next(train.create_input_iter(_data_run(tiny(tiny_mnist, f'folder:{root}')), data))
  assert batch['image'].shape == (32, 28, 28, 3) and batch['image'].dtype == np.float32
  assert set(batch['label'].tolist()) <= {0, 1, 2}


# ----------------------------------------------------------------------------
# Bad data is refused before any training step, in one line naming the fix.
# ----------------------------------------------------------------------------


def _bad_npz(**replace):
  return lambda tmp_path: f'npz:{write_npz(tmp_path / "data.npz", **replace)}'


def _folder(**kwargs):
  return lambda tmp_path: f'folder:{write_folder(tmp_path / "images", **kwargs)}'


def _file(name, content):
  def make(tmp_path):
    root = tmp_path / 'images'
    write_folder(root, per_class=5)
    path = root / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    return f'folder:{root}'

  return make


def _folder_with_test_class(tmp_path):
  write_folder(tmp_path / 'images' / 'train', per_class=5)
  write_folder(tmp_path / 'images' / 'test', per_class=2, classes=('circle', 'zebra'))
  return f'folder:{tmp_path / "images"}'


def _empty_folder(tmp_path):
  (tmp_path / 'images').mkdir()
  return f'folder:{tmp_path / "images"}'


def _not_npz(tmp_path):
  (tmp_path / 'data.npz').write_text('not a zip file')
  return f'npz:{tmp_path / "data.npz"}'


x_float = np.zeros((200, 28, 28), np.float32)
BAD = {
  'npz wrong keys': (
    _bad_npz(x_test=None, y_test=None, x_val=np.zeros((4, 28, 28), np.uint8)),
    {},
    r"lacks the arrays \['x_test', 'y_test'\]: the file has \['x_train', 'x_val', 'y_train'\], "
    r"and needs \['x_train', 'y_train', 'x_test', 'y_test'\]",
  ),
  'npz lengths differ': (
    _bad_npz(y_train=np.zeros(199, np.int64)),
    {},
    'x_train holds 200 images but y_train holds 199 labels',
  ),
  'negative label': (
    _bad_npz(y_train=np.r_[np.zeros(199, np.int64), -1]),
    {},
    r'y_train holds the negative label -1 \(index 199\); labels must be class ids 0..K-1',
  ),
  'non-integer labels': (
    _bad_npz(y_train=np.full(200, 0.5)),
    {},
    r'y_train has dtype float64; labels must be integer class ids 0..K-1 \(e.g. ',
  ),
  'test label out of range': (
    _bad_npz(y_test=np.full(60, 7)),
    {},
    r'y_test holds the label 7 \(index 0\), out of range: the training labels make 3 classes',
  ),
  'num_classes too small': (
    _bad_npz(),
    {'num_classes': 2},
    r'config.num_classes=2 is too small: .* labels up to 2; set --config.num_classes=0',
  ),
  'float images': (
    _bad_npz(x_train=x_float),
    {},
    r'x_train has dtype float32; images must be uint8 \(0..255\)',
  ),
  'train and test shapes differ': (
    _bad_npz(x_test=np.zeros((60, 32, 32), np.uint8)),
    {},
    'training images are 28x28x1 but test images 32x32x1',
  ),
  'image_size for fixed-size data': (
    _bad_npz(),
    {'image_size': 32},
    r'has images of one size, 28x28; config.image_size=32 resizes only data of mixed sizes',
  ),
  'no npz file': (lambda p: f'npz:{p / "missing.npz"}', {}, 'no such file .*missing.npz'),
  'not an npz file': (
    _not_npz,
    {},
    r"data.npz' is not an .npz file \(not a zip archive\); write it with np.savez",
  ),
  'no path': (lambda p: 'npz:', {}, "'npz:' lacks its argument; write it as npz:/path/data.npz"),
  'unknown prefix': (
    lambda p: 'foo:bar',
    {},
    r"unknown dataset 'foo:bar'; valid forms: cifar10, cifar100, imagenet2012, mnist, "
    r'tfds:NAME, npz:/path/data.npz, folder:/path/to/images',
  ),
  'not a folder': (lambda p: f'folder:{p / "nothing"}', {}, 'is not a folder'),
  'empty folder': (_empty_folder, {}, 'holds no class folders; it must hold one sub-folder'),
  'class folder without images': (
    _file('zebra/notes.txt', b'no images here'),
    {},
    r"the class folder .*zebra' holds no images \(.bmp .gif .*\); add images or remove",
  ),
  'unreadable image': (
    _file('circle/broken.png', b'\x89PNG\r\n not really'),
    {},
    r"cannot read the image .*circle/broken.png' \(UnidentifiedImageError",
  ),
  'mixed sizes': (
    _folder(per_class=5, sizes=[(28, 28), (30, 24)]),
    {},
    r'images of mixed sizes \(.*000.png. is 28x28, .*001.png. is 30x24\); '
    r'set --config.image_size=N',
  ),
  'too few images for a test split': (
    _folder(per_class=4),
    {},
    r'too few images to hold out a test split \(every 5th image of each class\)',
  ),
  'test class unknown to train': (
    _folder_with_test_class,
    {},
    r"test/ has class folders \['zebra'\] that train/ lacks",
  ),
  'bad normalization': (
    _bad_npz(),
    {'normalization': '((0.5, 0.5), (0.2, 0.2))'},
    r'config.normalization must be a pair \(mean, std\) of 1 per-channel values each',
  ),
  'tfds name unknown': (
    lambda p: 'tfds:no_such_dataset_xyz',
    {},
    r"'tfds:no_such_dataset_xyz': Dataset no_such_dataset_xyz not found; NAME must be",
  ),
  'tfds not image classification': (
    lambda p: 'tfds:imdb_reviews',
    {},
    r"is not an image classification dataset: .* has features \['label', 'text'\]",
  ),
}


@pytest.mark.parametrize('case', list(BAD))
def test_bad_data_is_refused_before_training(tmp_path, tiny_mnist, case):
  make, overrides, message = BAD[case]
  config = tiny(tiny_mnist, make(tmp_path), data_dir=str(tmp_path / 'tfds'), **overrides)
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=message) as info:
    train.train_and_evaluate(config, str(workdir))
  assert '\n' not in str(info.value)
  assert not workdir.exists()  # Refused before anything was written.


def test_unprepared_tfds_dataset_names_the_build_command(tmp_path, tiny_mnist):
  config = tiny(tiny_mnist, 'tfds:fashion_mnist', data_dir=str(tmp_path))
  with pytest.raises(datasets.DatasetNotPreparedError) as info:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert f'tfds build fashion_mnist --file_format=array_record --data_dir={tmp_path}' in str(
    info.value
  )


# ----------------------------------------------------------------------------
# Normalization.
# ----------------------------------------------------------------------------


def test_normalization_comes_from_the_training_records_only(tmp_path, tiny_mnist):
  x_train, y_train = make_images(100, 8, 3, seed=4)
  x_train[-10:] = 255  # The validation records (the last 10 %): must not count.
  path = write_npz(
    tmp_path / 'data.npz',
    x_train=x_train,
    y_train=y_train,
    x_test=x_train[:20],
    y_test=y_train[:20],
  )
  config = tiny(tiny_mnist, f'npz:{path}', batch_size=8)
  data = train.open_data(_data_run(config))
  assert len(data.val_indices) == 10
  x = x_train[:90] / 255.0
  mean, std = data.normalization
  np.testing.assert_allclose(mean, x.mean((0, 1, 2)), rtol=1e-10)
  np.testing.assert_allclose(std, x.std((0, 1, 2)), rtol=1e-10)
  # The pipelines use it: the test images come out as (x - mean) / std.
  batch = next(iter(train.eval_batches(_data_run(config), data, 'test')))
  expected = (x_train[:20] / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(batch['image'][:20], expected, atol=1e-5)
  # A config's normalization wins, given as text (a command-line flag) or as numbers.
  config.normalization = '((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))'
  assert train.open_data(_data_run(config)).normalization == ((0.5,) * 3, (0.25,) * 3)


def test_compute_and_parse_normalization():
  images, labels = make_images(50, 6, 3, seed=2)
  source = datasets.InMemorySource(images, labels)
  indices = np.arange(5, 45)
  mean, std = input_pipeline.compute_normalization(source, indices, chunk_size=7)
  x = images[5:45] / 255.0
  np.testing.assert_allclose(mean, x.mean((0, 1, 2)), rtol=1e-10)
  np.testing.assert_allclose(std, x.std((0, 1, 2)), rtol=1e-10)
  # A source that is not in memory (records one by one) gives the same numbers.
  records = input_pipeline.IndexedSource(source)
  np.testing.assert_allclose(input_pipeline.compute_normalization(records, indices)[1], std)
  constant = datasets.InMemorySource(np.full((4, 2, 2, 1), 7, np.uint8), np.zeros(4))
  assert input_pipeline.compute_normalization(constant)[1] == (1.0,)
  assert input_pipeline.parse_normalization('', 3) is None
  assert input_pipeline.parse_normalization(None, 3) is None
  assert input_pipeline.parse_normalization([[0.1], [0.2]], 1) == ((0.1,), (0.2,))
  for bad in ('0.5', '((0.5,), (0.0,))', 'mean', ((0.5,), (0.2, 0.2))):
    with pytest.raises(ValueError, match='config.normalization'):
      input_pipeline.parse_normalization(bad, 1)


def test_builtin_normalization_is_unchanged(tiny_mnist):
  assert train.open_data(_data_run(tiny_mnist())).normalization == ((0.1307,), (0.3081,))
  assert input_pipeline.NORMALIZATION['mnist'] == ((0.1307,), (0.3081,))
  assert datasets.get_spec('cifar10').normalization == input_pipeline.NORMALIZATION['cifar10']
  assert [
    datasets.get_spec(n).recipe for n in ('mnist', 'cifar10', 'cifar100', 'imagenet2012')
  ] == [
    'none',
    'cifar',
    'cifar',
    'imagenet',
  ]


# ----------------------------------------------------------------------------
# The forms' details.
# ----------------------------------------------------------------------------


def test_npz_spec_and_sources(tmp_path):
  path = write_npz(tmp_path / 'data.npz', n_train=50, n_test=10)  # (N, H, W): no channel axis
  spec = datasets.get_spec(f'npz:{path}')
  assert (spec.num_classes, spec.image_shape, spec.channels) == (3, (28, 28, 1), 1)
  assert spec.split_sizes == {'train': 50, 'test': 10} and spec.validation_size == 5
  assert spec.normalization is None and spec.recipe == 'none' and spec.tfds_name is None
  assert datasets.get_spec(f'npz:{path}') is spec  # Read once while the file is unchanged.
  source = datasets.get_data_source(spec, 'train[10:20]')
  assert isinstance(source, datasets.InMemorySource) and len(source) == 10
  np.testing.assert_array_equal(source.labels, make_images(50)[1][10:20])
  assert datasets.num_examples(spec, 'train[:40%]') == 20
  assert repr(datasets.get_data_source(spec, 'test')).startswith('InMemorySource(name=npz:')
  assert datasets.user_validation_size(100_000) == 5_000


def test_folder_layouts(tmp_path):
  root = tmp_path / 'images'
  write_folder(root / 'train', per_class=6, mode='L', classes=('b', 'a'))
  write_folder(root / 'test', per_class=2, mode='L', classes=('a',))
  (root / 'train' / 'a' / 'README.txt').write_text('ignored')
  splits, classes, held_out = datasets.load_image_folder(root)
  assert classes == ('a', 'b') and not held_out  # Sorted class names are the labels.
  images, labels = splits['train']
  assert images.shape == (12, 28, 28, 1)  # All grey: one channel.
  assert sorted(labels.tolist()) == [0] * 6 + [1] * 6
  assert labels[:6].tolist() != [0] * 6  # A fixed shuffle mixes the classes.
  assert splits['test'][1].tolist() == [0, 0]
  # Without test/: every 5th image of each class (in file name order) is held out.
  flat = write_folder(tmp_path / 'flat', per_class=11, mode='RGBA')
  splits, classes, held_out = datasets.load_image_folder(flat)
  assert held_out and classes == CLASSES
  assert splits['train'][0].shape == (27, 28, 28, 3) and splits['test'][0].shape == (6, 28, 28, 3)
  assert splits['test'][1].tolist() == [0, 0, 1, 1, 2, 2]
  expected = np.asarray(PIL.Image.open(f'{flat}/square/004.png').convert('RGB'))
  np.testing.assert_array_equal(splits['test'][0][2], expected)


def test_folder_of_mixed_sizes_with_image_size(tmp_path, tiny_mnist):
  root = write_folder(tmp_path / 'images', per_class=5, sizes=[(28, 28), (40, 30), (17, 50)])
  spec = datasets.get_spec(f'folder:{root}', image_size=20)
  assert spec.image_shape == (20, 20, 3)
  config = tiny(tiny_mnist, f'folder:{root}', image_size=20, batch_size=4)
  assert datasets.classes_and_shape(config) == (3, (20, 20, 3))
  data = train.open_data(_data_run(config))
  assert next(train.create_input_iter(_data_run(config), data))['image'].shape == (
    4,
    20,
    20,
    3,
  )


@pytest.mark.parametrize('name', ['tfds:fashion_mnist', 'tfds:mnist'])
def test_tfds_dataset_under_mock_data(tmp_path, tiny_mnist, name):
  config = tiny(tiny_mnist, name, batch_size=8, data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=40, policy=MOCK):
    spec = datasets.spec_for_config(config)
    assert (spec.num_classes, spec.image_shape, spec.test_split) == (10, (28, 28, 1), 'test')
    assert spec.split_sizes == {'train': 40, 'test': 40} and spec.validation_size == 4
    data = train.open_data(_data_run(config))
    assert len(data.train_indices) == 36 and isinstance(data.train_source, datasets.InMemorySource)
    batch = next(train.create_input_iter(_data_run(config), data))
    evals = list(train.eval_batches(_data_run(config), data, 'val'))
  assert batch['image'].shape == (8, 28, 28, 1)
  assert sum(int(b['mask'].sum()) for b in evals) == 4
  x = data.train_source.images[:36] / 255.0
  np.testing.assert_allclose(data.normalization[0], x.mean((0, 1, 2)), rtol=1e-10)


def test_tfds_dataset_of_varying_size_under_mock_data(tmp_path, tiny_mnist):
  config = tiny(tiny_mnist, 'tfds:imagenette/160px', batch_size=4, data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=12, policy=MOCK):
    with pytest.raises(ValueError, match=r'varying size \(None, None, 3\); set --config.image_'):
      datasets.spec_for_config(config)
    config.image_size = 24
    data = train.open_data(_data_run(config))
    assert data.image_shape == (24, 24, 3) and data.spec.recipe == 'resize'
    assert not isinstance(data.train_source, datasets.InMemorySource)
    batch = next(train.create_input_iter(_data_run(config), data))
  assert batch['image'].shape == (4, 24, 24, 3)


def test_register_a_dataset_and_a_form(monkeypatch, tmp_path):
  # `register` and `get_spec` use the registry module's dicts; the package re-exports DATASETS.
  registered = dict(registry.DATASETS)
  monkeypatch.setattr(registry, 'DATASETS', registered)
  monkeypatch.setattr(datasets, 'DATASETS', registered)
  monkeypatch.setattr(registry, '_FACTORIES', dict(registry._FACTORIES))
  arrays = {'train': make_images(30, 8), 'test': make_images(30, 8)}
  sizes = {'train': 30, 'test': 30}
  digits = datasets.DatasetSpec('digits', None, 3, (8, 8, 1), sizes, 'test', 3, arrays=arrays)
  datasets.register('digits', digits)
  assert datasets.get_spec('digits') is digits
  assert len(datasets.get_data_source('digits', 'test')) == 30
  seen = []

  def factory(argument, *, data_dir, image_size):
    seen.append((argument, data_dir, image_size))
    return digits

  datasets.register('shapes', factory, usage='shapes:SEED')
  assert datasets.get_spec('shapes:7', data_dir=str(tmp_path)) is digits
  assert seen == [('7', str(tmp_path), None)]
  assert 'shapes:SEED' in datasets.valid_forms()
  with pytest.raises(ValueError, match="'digits' is registered already; pass replace=True"):
    datasets.register('digits', digits)
  with pytest.raises(ValueError, match="the spec is named 'digits', not 'other'"):
    datasets.register('other', digits)
  with pytest.raises(ValueError, match='dataset names are'):
    datasets.register('a:b', factory)
  datasets.register('digits', factory, replace=True)
  assert 'digits' not in datasets.DATASETS


def test_embedded_mnist_needs_no_tfds():
  code = (
    'import sys\n'
    'from ec2t_jax.training import datasets\n'
    "images, labels = datasets.load_embedded_mnist()['train']\n"
    "source = datasets.get_data_source('mnist', 'test', in_memory=True)\n"
    'assert images.shape == (60000, 28, 28) and len(source) == 10000\n'
    "assert 'tensorflow_datasets' not in sys.modules, 'tfds was imported'\n"
  )
  subprocess.run([sys.executable, '-c', code], check=True, timeout=120)
