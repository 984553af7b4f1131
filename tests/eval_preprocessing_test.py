"""Tests of the original implementation's statistics and the configurable evaluation resize.

`ec2t_jax.training.datasets` (CIFAR-10's statistics) and
`ec2t_jax.training.input_pipeline` (`parse_normalization` by dataset name,
`crop_fraction` / `resize_method` of the 'imagenet' recipe's evaluation).
"""

import math

import numpy as np
import PIL.Image
import pytest

from ec2t_jax.training import datasets, input_pipeline

CIFAR10_ORIGINAL = (
  (125.3 / 255, 123.0 / 255, 113.9 / 255),
  (63.0 / 255, 62.1 / 255, 66.7 / 255),
)


def smooth_image(height, width, channels=3):
  """A uint8 gradient image (every resampling filter gives close, but different, values)."""
  yy, xx = np.mgrid[0:height, 0:width]
  planes = [(yy * 7 + xx * 3) % 256, (xx * 5) % 256, (yy * 2 + xx) % 256][:channels]
  return np.stack(planes, -1).astype(np.uint8)


def eval_image(image, size, **kwargs):
  """The 'imagenet' recipe's evaluation output (uint8) of one image."""
  element = {'image': image, 'label': 0}
  for op in input_pipeline.preprocess_ops('imagenet2012', train=False, image_size=size, **kwargs):
    element = op.map(element)
  return element['image']


def eval_batch(images, size, **kwargs):
  """The normalized evaluation batch of `create_split` over `images`."""
  source = datasets.InMemorySource(images, np.arange(len(images)), name='eval')
  channels = images.shape[-1]
  it = input_pipeline.create_split(
    source,
    batch_size=len(images),
    train=False,
    seed=0,
    dataset='imagenet2012',
    image_size=size,
    normalization=((0.5,) * channels, (0.25,) * channels),
    **kwargs,
  )
  return next(it)['image']


# ----------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------


def test_cifar10_statistics_are_the_original_implementations():
  assert datasets.get_spec('cifar10').normalization == CIFAR10_ORIGINAL
  assert input_pipeline.NORMALIZATION['cifar10'] == CIFAR10_ORIGINAL
  mean, std = datasets.get_spec('cifar10').normalization
  np.testing.assert_allclose(mean, [0.491373, 0.482353, 0.446667], atol=1e-6)
  np.testing.assert_allclose(std, [0.247059, 0.243529, 0.261569], atol=1e-6)
  # CIFAR-100 keeps its own statistics.
  assert datasets.get_spec('cifar100').normalization == (
    (0.5071, 0.4865, 0.4409),
    (0.2673, 0.2564, 0.2762),
  )


def test_parse_normalization_by_dataset_name():
  assert input_pipeline.parse_normalization('cifar10', 3) == CIFAR10_ORIGINAL
  assert input_pipeline.parse_normalization(' cifar10 ', 3) == CIFAR10_ORIGINAL
  assert input_pipeline.parse_normalization('mnist', 1) == ((0.1307,), (0.3081,))
  assert input_pipeline.parse_normalization('imagenet2012', 3) == (
    datasets.get_spec('imagenet2012').normalization
  )
  assert {'cifar10', 'cifar100', 'imagenet2012', 'mnist'} <= set(
    input_pipeline.normalization_names()
  )
  # The pair forms still work.
  assert input_pipeline.parse_normalization('[[0.5], [0.25]]', 1) == ((0.5,), (0.25,))


@pytest.mark.parametrize('bad', ['cifar', 'CIFAR10', 'tfds:fashion_mnist', 'npz:/data/x.npz'])
def test_parse_normalization_unknown_name_lists_valid_names(bad):
  with pytest.raises(ValueError) as error:
    input_pipeline.parse_normalization(bad, 3)
  message = str(error.value)
  assert '\n' not in message and repr(bad) in message
  for name in ('cifar10', 'cifar100', 'imagenet2012', 'mnist'):
    assert name in message


def test_parse_normalization_name_without_statistics(monkeypatch):
  spec = datasets.DatasetSpec(
    name='nostats',
    tfds_name=None,
    num_classes=2,
    image_shape=(4, 4, 3),
    split_sizes={'train': 2, 'test': 2},
    test_split='test',
    validation_size=0,
  )
  monkeypatch.setitem(datasets.DATASETS, 'nostats', spec)
  assert 'nostats' not in input_pipeline.normalization_names()
  with pytest.raises(ValueError, match=r"'nostats' names no dataset with statistics.*cifar10"):
    input_pipeline.parse_normalization('nostats', 3)


def test_parse_normalization_name_checks_channels():
  with pytest.raises(ValueError, match=r"3 channels; got 'mnist' \(1 means, 1 stds\)"):
    input_pipeline.parse_normalization('mnist', 3)
  with pytest.raises(ValueError, match=r"1 channels; got 'cifar10'"):
    input_pipeline.parse_normalization('cifar10', 1)


def test_cifar100_evaluated_with_cifar10_statistics():
  images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  source = datasets.InMemorySource(images, np.arange(4), name='c100')
  normalization = input_pipeline.parse_normalization('cifar10', 3)
  it = input_pipeline.create_split(
    source, batch_size=4, train=False, seed=0, dataset='cifar100', normalization=normalization
  )
  mean, std = (np.array(v) for v in CIFAR10_ORIGINAL)
  np.testing.assert_allclose(next(it)['image'], (images / 255.0 - mean) / std, atol=1e-5)


# ----------------------------------------------------------------------------
# Evaluation resize of the 'imagenet' recipe.
# ----------------------------------------------------------------------------


def test_default_is_resize_256_center_crop_224():
  # Shorter side 256 -> no resize at 224 / 0.875: the default is the central 224 crop.
  image = np.random.default_rng(2).integers(0, 256, (256, 320, 3), dtype=np.uint8)
  np.testing.assert_array_equal(eval_image(image, 224), image[16:240, 48:272])
  # And a resize: shorter side 128 -> 64 (= 56 / 0.875), the central 56 of 64x80.
  image = smooth_image(128, 160)
  box = (24, 8, 136, 120)  # The central 112-pixel square: 56 pixels at scale 1/2.
  reference = np.asarray(
    PIL.Image.fromarray(image).resize((56, 56), PIL.Image.Resampling.BILINEAR, box=box)
  )
  np.testing.assert_array_equal(eval_image(image, 56), reference)


@pytest.mark.parametrize('shape', [(40, 60, 3), (61, 33, 1), (24, 24, 3)])
def test_default_equals_explicit_crop_fraction_and_bilinear(shape):
  images = np.random.default_rng(3).integers(0, 256, (3,) + shape, dtype=np.uint8)
  default = eval_batch(images, 24)
  explicit = eval_batch(images, 24, crop_fraction=0.875, resize_method='bilinear')
  assert default.shape == (3, 24, 24, shape[-1]) and default.dtype == np.float32
  np.testing.assert_array_equal(default, explicit)
  # '' reads as the default method (the config's "not set").
  np.testing.assert_array_equal(default, eval_batch(images, 24, resize_method=''))


def test_crop_fraction_one_resizes_shorter_side_to_size():
  image = smooth_image(40, 60)
  full = eval_image(image, 24, crop_fraction=1.0)
  assert full.shape == (24, 24, 3) and full.dtype == np.uint8
  assert not np.array_equal(full, eval_image(image, 24))
  # 40x60 -> 24x36, then the central 24 columns.
  resized = np.asarray(PIL.Image.fromarray(image).resize((36, 24), PIL.Image.Resampling.BILINEAR))
  assert np.abs(full.astype(int) - resized[:, 6:30].astype(int)).mean() < 1.5
  # A square image of the evaluation size passes unchanged: no crop margin.
  square = np.random.default_rng(4).integers(0, 256, (24, 24, 3), dtype=np.uint8)
  np.testing.assert_array_equal(eval_image(square, 24, crop_fraction=1.0), square)
  assert not np.array_equal(eval_image(square, 24), square)


@pytest.mark.parametrize('channels', [3, 1])
def test_bicubic_differs_from_bilinear(channels):
  image = np.random.default_rng(5).integers(0, 256, (50, 70, channels), dtype=np.uint8)
  bilinear = eval_image(image, 24, resize_method='bilinear')
  bicubic = eval_image(image, 24, resize_method='bicubic')
  for out in (bilinear, bicubic):
    assert out.shape == (24, 24, channels) and out.dtype == np.uint8
  assert not np.array_equal(bilinear, bicubic)
  # The original's EfficientNet evaluation: bicubic, no crop margin.
  both = eval_batch(image[None], 24, crop_fraction=1.0, resize_method='bicubic')
  assert both.shape == (1, 24, 24, channels) and both.dtype == np.float32
  assert not np.array_equal(both, eval_batch(image[None], 24, resize_method='bicubic'))


@pytest.mark.parametrize('bad', [0, 0.0, -0.5, 1.5, math.nan, True, '0.9'])
def test_bad_crop_fraction(bad):
  with pytest.raises(ValueError, match=r'crop_fraction must be a number in \(0, 1\].*got'):
    eval_image(smooth_image(8, 8), 4, crop_fraction=bad)
  images = smooth_image(8, 8)[None]
  with pytest.raises(ValueError, match='crop_fraction must be'):
    eval_batch(images, 4, crop_fraction=bad)


@pytest.mark.parametrize('bad', ['nearest', 'BICUBIC', 'cubic', 3])
def test_bad_resize_method(bad):
  with pytest.raises(ValueError, match=r"resize_method must be one of 'bilinear', 'bicubic', got"):
    eval_image(smooth_image(8, 8), 4, resize_method=bad)


@pytest.mark.parametrize('dataset', ['cifar10', 'mnist'])
def test_eval_resize_only_for_the_imagenet_recipe(dataset):
  with pytest.raises(ValueError, match=r"crop_fraction=1.0 applies only .*'imagenet' recipe"):
    input_pipeline.preprocess_ops(dataset, train=False, crop_fraction=1.0)
  with pytest.raises(ValueError, match=r"resize_method='bicubic' applies only"):
    input_pipeline.preprocess_ops(dataset, train=False, resize_method='bicubic')
  # None (and '' for the method) is the default everywhere.
  assert input_pipeline.preprocess_ops(dataset, train=False, crop_fraction=None, resize_method='')
