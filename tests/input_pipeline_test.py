"""Tests of ec2t_jax.training.input_pipeline: recipes, determinism, sharding, padding, state."""

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from ec2t_jax.training import datasets, input_pipeline

MOCK = tfds.testing.MockPolicy.USE_CODE
RNG = np.random.default_rng(0)


def indexed_source(n, shape=(8, 8, 3)):
  """In-memory source whose label is the record's index (to track coverage)."""
  images = RNG.integers(0, 256, (n,) + shape, dtype=np.uint8)
  return datasets.InMemorySource(images, np.arange(n), name=f'indexed{n}')


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def element(image):
  return {'image': image, 'label': 0}


# ----------------------------------------------------------------------------
# Indices and padding.
# ----------------------------------------------------------------------------


def test_split_indices():
  train, val = input_pipeline.split_indices(10, 3)
  np.testing.assert_array_equal(train, np.arange(7))
  np.testing.assert_array_equal(val, [7, 8, 9])
  train, val = input_pipeline.split_indices(60_000, 5_000)
  assert len(train) == 55_000 and val[0] == 55_000 and val[-1] == 59_999
  assert input_pipeline.split_indices(5, 0)[1].size == 0
  with pytest.raises(ValueError, match='validation_size must be in'):
    input_pipeline.split_indices(5, 5)
  with pytest.raises(ValueError, match='num_train'):
    input_pipeline.split_indices(0, 0)


def test_indexed_source_pads_with_mask():
  base = indexed_source(10)
  view = input_pipeline.IndexedSource(base, [7, 2, 5], pad_to=8)
  assert len(view) == 8
  assert [int(view[i]['label']) for i in range(8)] == [7, 2, 5, 7, 7, 7, 7, 7]
  assert [view[i]['mask'] for i in range(8)] == [True] * 3 + [False] * 5
  assert 'mask' not in input_pipeline.IndexedSource(base, [1])[0]
  assert repr(view) == repr(input_pipeline.IndexedSource(base, np.array([7, 2, 5]), pad_to=8))
  with pytest.raises(ValueError, match=r'indices must lie in \[0, 10\)'):
    input_pipeline.IndexedSource(base, [3, 10])
  with pytest.raises(IndexError):
    view[8]


# ----------------------------------------------------------------------------
# Per-example transforms.
# ----------------------------------------------------------------------------


def test_random_crop_flip_is_a_shifted_window():
  image = RNG.integers(1, 256, (32, 32, 3), dtype=np.uint8)  # no zeros: padding is visible
  op = input_pipeline.RandomCropFlip(pad=4, flip=False)
  for seed in range(20):
    out = op.random_map(element(image), np.random.default_rng(seed))['image']
    assert out.shape == image.shape and out.dtype == np.uint8
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    matches = [
      (dy, dx)
      for dy in range(9)
      for dx in range(9)
      if np.array_equal(padded[dy : dy + 32, dx : dx + 32], out)
    ]
    assert len(matches) == 1
  identity = input_pipeline.RandomCropFlip(pad=0, flip=False)
  np.testing.assert_array_equal(
    identity.random_map(element(image), np.random.default_rng(0))['image'], image
  )
  flips = [
    np.array_equal(
      input_pipeline.RandomCropFlip(pad=0).random_map(element(image), np.random.default_rng(s))[
        'image'
      ],
      image[:, ::-1],
    )
    for s in range(40)
  ]
  assert 5 < sum(flips) < 35


def test_color_jitter():
  image = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  off = input_pipeline.ColorJitter(0.0, 0.0, 0.0, 0.0)
  out = off.random_map(element(image), np.random.default_rng(0))['image']
  np.testing.assert_allclose(out, image / 255.0, atol=1e-6)
  on = input_pipeline.ColorJitter()
  a = on.random_map(element(image), np.random.default_rng(3))['image']
  b = on.random_map(element(image), np.random.default_rng(3))['image']
  c = on.random_map(element(image), np.random.default_rng(4))['image']
  assert a.dtype == np.float32 and a.shape == image.shape
  assert 0.0 <= a.min() and a.max() <= 1.0
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_hue_rotation_keeps_luma_and_inverts():
  m = input_pipeline.hue_rotation_matrix(0.075)
  luma = np.array([0.299, 0.587, 0.114])
  np.testing.assert_allclose(luma @ m, luma, atol=1e-6)  # Y unchanged
  np.testing.assert_allclose(
    input_pipeline.hue_rotation_matrix(-0.075) @ m, np.eye(3), atol=1e-6
  )  # R(-θ) R(θ) = I
  np.testing.assert_allclose(input_pipeline.hue_rotation_matrix(0.0), np.eye(3), atol=1e-6)
  gray = np.full(3, 0.5)
  np.testing.assert_allclose(m @ gray, gray, atol=1e-6)  # grays have no hue


def test_cutout():
  image = np.full((32, 32, 3), 255, np.uint8)
  op = input_pipeline.Cutout(size=16, fill=(0.25, 0.5, 0.75))
  sizes = []
  for seed in range(50):
    out = op.random_map(element(image), np.random.default_rng(seed))['image']
    hole = np.all(out != 1.0, axis=-1)
    ys, xs = np.nonzero(hole)
    assert ys.size > 0
    # One axis-aligned rectangle, at most 16 x 16, filled with `fill`.
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert h <= 16 and w <= 16 and hole.sum() == h * w
    np.testing.assert_allclose(out[hole], np.tile([0.25, 0.5, 0.75], (hole.sum(), 1)))
    sizes.append(hole.sum())
  assert max(sizes) == 256 and min(sizes) < 256  # clipped at the borders sometimes


def test_random_resized_crop_and_center_crop_shapes():
  rrc = input_pipeline.RandomResizedCrop(24)
  for seed, shape in enumerate([(40, 60, 3), (17, 47, 3), (300, 20, 3), (24, 24, 3)]):
    image = RNG.integers(0, 256, shape, dtype=np.uint8)
    out = rrc.random_map(element(image), np.random.default_rng(seed))['image']
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    out = input_pipeline.ResizeCenterCrop(24).map(element(image))['image']
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8


def test_resize_center_crop_matches_resize_then_crop():
  # A smooth image, so that one resize of the box and resize-then-crop agree closely.
  yy, xx = np.mgrid[0:128, 0:160]
  image = np.stack([yy * 2, xx * 1.5, (yy + xx) * 0.8], -1).astype(np.uint8)
  out = input_pipeline.ResizeCenterCrop(56, crop_fraction=0.875).map(element(image))['image']
  # Shorter side 128 -> round(56 / 0.875) = 64, i.e. 160 -> 80; then the central 56.
  resized = np.asarray(PIL.Image.fromarray(image).resize((80, 64), PIL.Image.Resampling.BILINEAR))
  reference = resized[4:60, 12:68].astype(int)
  assert out.shape == (56, 56, 3)
  assert np.abs(out.astype(int) - reference).mean() < 1.5


def test_preprocess_ops_errors():
  with pytest.raises(ValueError, match='image_size must be None or 32'):
    input_pipeline.preprocess_ops('cifar10', train=True, image_size=64)
  with pytest.raises(ValueError, match='unknown dataset'):
    input_pipeline.preprocess_ops('svhn', train=True)
  assert len(input_pipeline.preprocess_ops('mnist', train=True)) == 1  # no augmentation


# ----------------------------------------------------------------------------
# Pipelines.
# ----------------------------------------------------------------------------


def test_mnist_normalization_exact():
  images, labels = datasets.load_embedded_mnist()['test']
  source = datasets.InMemorySource(images[:64, ..., None], labels[:64], name='mnist64')
  it = input_pipeline.create_split(source, batch_size=16, train=False, seed=0, dataset='mnist')
  batch = next(it)
  assert batch['image'].shape == (16, 28, 28, 1) and batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32 and batch['mask'].dtype == bool
  expected = (images[:16, ..., None] / 255.0 - 0.1307) / 0.3081
  np.testing.assert_allclose(batch['image'], expected, atol=1e-5)
  np.testing.assert_array_equal(batch['label'], labels[:16])


def test_cifar10_train_on_mock_data_deterministic_and_in_range():
  with tfds.testing.mock_data(num_examples=64, policy=MOCK):
    source = datasets.get_data_source('cifar10', 'train')
    n = datasets.num_examples('cifar10', 'train', fallback=64)
    train_idx, _ = input_pipeline.split_indices(n, 16)

    def run(seed):
      it = input_pipeline.create_split(
        source, batch_size=8, train=True, seed=seed, dataset='cifar10', indices=train_idx
      )
      return take(it, 4)

    a, b, c = run(1), run(1), run(2)
  assert_batches_equal(a, b)
  assert not np.array_equal(a[0]['image'], c[0]['image'])
  batch = a[0]
  assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  assert 'mask' not in batch
  mean, std = (np.array(v) for v in input_pipeline.NORMALIZATION['cifar10'])
  lo, hi = (0 - mean) / std, (1 - mean) / std
  images = np.concatenate([x['image'] for x in a])
  assert np.all(images >= lo - 1e-5) and np.all(images <= hi + 1e-5)
  # Cutout filled with the mean: exact zeros after normalization in every image.
  assert all(np.any(np.all(img == 0.0, axis=-1)) for img in images)


def test_cifar_augmentation_changes_images_but_not_labels():
  source = indexed_source(32, shape=(32, 32, 3))
  plain = take(
    input_pipeline.create_split(
      source, batch_size=8, train=True, seed=5, dataset='cifar100', augment=False
    ),
    2,
  )
  augmented = take(
    input_pipeline.create_split(source, batch_size=8, train=True, seed=5, dataset='cifar100'),
    2,
  )
  for p, q in zip(plain, augmented, strict=True):
    np.testing.assert_array_equal(p['label'], q['label'])  # same order for a seed
    assert not np.allclose(p['image'], q['image'])


def test_imagenet_on_mock_data():
  with tfds.testing.mock_data(num_examples=20, policy=MOCK):
    train = datasets.get_data_source('imagenet2012', 'train')
    val = datasets.get_data_source('imagenet2012', 'validation')
    it = input_pipeline.create_split(
      train, batch_size=4, train=True, seed=0, dataset='imagenet2012', image_size=32
    )
    batches = take(it, 2)
    evals = list(
      input_pipeline.create_split(
        val, batch_size=8, train=False, seed=0, dataset='imagenet2012', image_size=32
      )
    )
  assert batches[0]['image'].shape == (4, 32, 32, 3)
  assert batches[0]['image'].dtype == np.float32
  assert len(evals) == 3 and sum(int(b['mask'].sum()) for b in evals) == 20
  assert evals[0]['image'].shape == (8, 32, 32, 3)


def test_eval_covers_every_example_once_across_shards():
  source = indexed_source(37)
  indices = np.arange(3, 37)  # 34 records
  seen, lengths = [], []
  for shard in range(2):
    batches = list(
      input_pipeline.create_split(
        source,
        batch_size=4,
        train=False,
        seed=0,
        dataset='cifar10',
        image_size=None,
        indices=indices,
        shard_index=shard,
        shard_count=2,
      )
    )
    lengths.append(len(batches))
    for b in batches:
      assert b['image'].shape[0] == 4  # padded: always full batches
      seen.extend(b['label'][b['mask']].tolist())
  assert (
    lengths[0]
    == lengths[1]
    == input_pipeline.num_batches(34, batch_size=4, train=False, shard_count=2)
  )
  assert sorted(seen) == list(range(3, 37))


def test_train_shards_are_disjoint_and_cover():
  source = indexed_source(48)
  per_shard = []
  for shard in range(2):
    it = input_pipeline.create_split(
      source,
      batch_size=6,
      train=True,
      seed=3,
      dataset='cifar10',
      shard_index=shard,
      shard_count=2,
      num_epochs=1,
      augment=False,
    )
    batches = list(it)
    assert len(batches) == input_pipeline.num_batches(48, batch_size=6, train=True, shard_count=2)
    per_shard.append({int(x) for b in batches for x in b['label']})
  assert per_shard[0].isdisjoint(per_shard[1])
  assert per_shard[0] | per_shard[1] == set(range(48))


def test_train_reshuffles_every_epoch():
  source = indexed_source(16)
  it = input_pipeline.create_split(
    source, batch_size=16, train=True, seed=0, dataset='cifar10', num_epochs=3, augment=False
  )
  epochs = [b['label'].tolist() for b in it]
  assert len(epochs) == 3
  assert all(sorted(e) == list(range(16)) for e in epochs)
  assert epochs[0] != epochs[1]


@pytest.mark.parametrize('dataset', ['cifar10', 'mnist'])
def test_state_restore_resumes_identical_batches(dataset):
  shape = (28, 28, 1) if dataset == 'mnist' else (32, 32, 3)
  source = indexed_source(40, shape=shape)

  def make():
    return input_pipeline.create_split(
      source, batch_size=8, train=True, seed=11, dataset=dataset, read_threads=2
    )

  it = make()
  take(it, 7)  # crosses an epoch boundary (5 batches per epoch)
  state = it.get_state()
  assert isinstance(state, bytes)
  expected = take(it, 6)
  restored = make()
  restored.set_state(state)
  assert_batches_equal(take(restored, 6), expected)


def test_create_split_argument_errors():
  source = indexed_source(16)
  kwargs = {'batch_size': 4, 'train': True, 'seed': 0, 'dataset': 'cifar10'}
  with pytest.raises(ValueError, match='unknown dataset'):
    input_pipeline.create_split(source, **{**kwargs, 'dataset': 'svhn'})
  with pytest.raises(ValueError, match='seed must be'):
    input_pipeline.create_split(source, **{**kwargs, 'seed': -1})
  with pytest.raises(ValueError, match='shard_index'):
    input_pipeline.create_split(source, **kwargs, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match='batch_size'):
    input_pipeline.create_split(source, **{**kwargs, 'batch_size': 0})
  with pytest.raises(ValueError, match='cannot fill one batch'):
    input_pipeline.create_split(source, **{**kwargs, 'batch_size': 17})
  with pytest.raises(ValueError, match='exactly one pass'):
    input_pipeline.create_split(source, **{**kwargs, 'train': False}, num_epochs=2)


def test_state_restore_with_a_tfds_source():
  with tfds.testing.mock_data(num_examples=32, policy=MOCK):
    source = datasets.get_data_source('cifar10', 'train')
    train_idx, _ = input_pipeline.split_indices(32, 8)

    def make():
      return input_pipeline.create_split(
        source, batch_size=4, train=True, seed=2, dataset='cifar10', indices=train_idx
      )

    it = make()
    take(it, 3)
    state = it.get_state()
    assert b'IndexedSource(source=ArrayRecordDataSource(name=cifar10' in state
    expected = take(it, 4)
    restored = make()
    restored.set_state(state)
    assert_batches_equal(take(restored, 4), expected)


def test_in_memory_mnist_fast_path_is_exact_and_resumable():
  images = np.arange(100 * 28 * 28, dtype=np.int64).reshape(100, 28, 28, 1) % 251
  source = datasets.InMemorySource(images.astype(np.uint8), np.arange(100))  # label = id
  make = lambda **kw: input_pipeline.create_split(
    source, batch_size=8, train=True, seed=3, dataset='mnist', indices=np.arange(90), **kw
  )
  it = make()
  assert isinstance(it, input_pipeline.ArrayBatchIterator)
  first = take(it, 11)  # 90 // 8 = 11 batches per epoch, each example at most once
  labels = np.concatenate([b['label'] for b in first])
  assert labels.dtype == np.int32 and len(labels) == 88
  state = it.get_state()
  expected = take(it, 5)
  resumed = make()
  resumed.set_state(state)
  for a, b in zip(take(resumed, 5), expected, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
  # Shards of two processes are disjoint, and each image is normalized like grain's path.
  s0 = np.concatenate([b['label'] for b in take(make(shard_index=0, shard_count=2), 5)])
  s1 = np.concatenate([b['label'] for b in take(make(shard_index=1, shard_count=2), 5)])
  assert len(s0) == len(s1) == 40
  assert not set(s0.tolist()) & set(s1.tolist())
  assert len(set(labels.tolist())) == 88 and max(labels) < 90  # no validation example
  np.testing.assert_allclose(
    first[0]['image'].mean(), ((images[:90] / 255.0 - 0.1307) / 0.3081).mean(), atol=0.5
  )


def test_resize_recipe_and_explicit_normalization():
  spec = datasets.DatasetSpec(
    'varying', 'varying', 2, None, {'train': 8, 'test': 8}, 'test', 0, recipe='resize'
  )
  with pytest.raises(ValueError, match='pass image_size'):
    input_pipeline.preprocess_ops(spec, train=True)
  ops = input_pipeline.preprocess_ops(spec, train=True, image_size=12)
  assert [type(op).__name__ for op in ops] == ['SelectFeatures', 'Resize']
  image = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  assert ops[1].map(element(image))['image'].shape == (12, 12, 3)
  same = RNG.integers(0, 256, (12, 12, 1), dtype=np.uint8)
  assert ops[1].map(element(same))['image'] is same
  source = indexed_source(16, shape=(8, 8, 1))
  kwargs = {'batch_size': 4, 'train': False, 'seed': 0, 'dataset': spec, 'image_size': 12}
  with pytest.raises(ValueError, match='has no normalization of its own'):
    input_pipeline.create_split(source, **kwargs)
  batch = next(input_pipeline.create_split(source, **kwargs, normalization=((0.5,), (0.5,))))
  assert batch['image'].shape == (4, 12, 12, 1)
  assert -1.0 <= batch['image'].min() and batch['image'].max() <= 1.0
