"""The per-example transforms of each dataset recipe: `preprocess_ops`.

A dataset spec's `recipe` ('none', 'cifar', 'imagenet', 'resize') chooses
them; see the `ec2t_jax.training.input_pipeline` docstring.
"""

from typing import Any

import grain

from ec2t_jax.training import datasets
from ec2t_jax.training.datasets import Normalization
from ec2t_jax.training.input_pipeline.transforms import (
  DEFAULT_RESIZE_METHOD,
  IMAGENET_CROP_FRACTION,
  ColorJitter,
  Cutout,
  RandomCropFlip,
  RandomResizedCrop,
  Resize,
  ResizeCenterCrop,
  SelectFeatures,
  check_crop_fraction,
  check_resize_method,
)

DEFAULT_IMAGENET_SIZE = 224


def preprocess_ops(
  dataset: str | datasets.DatasetSpec,
  *,
  train: bool,
  augment: bool | None = None,
  image_size: int | None = None,
  normalization: Normalization | None = None,
  crop_fraction: float | None = None,
  resize_method: str | None = None,
) -> list[grain.transforms.Map | grain.transforms.RandomMap]:
  """The per-example transforms of a dataset's recipe (before batching).

  Args:
    dataset: a registered dataset name (see `ec2t_jax.training.datasets.valid_forms`)
      or its `DatasetSpec`; its `recipe` chooses the transforms.
    train: training (`True`) or evaluation transforms.
    augment: apply the random augmentations; defaults to `train`.
    image_size: output side for ImageNet (default 224) and for the 'resize'
      recipe (required); for the fixed-size datasets `None` or their native size.
    normalization: the `(mean, std)` in use when it is not the dataset's
      (Cutout fills its hole with the mean).
    crop_fraction: the 'imagenet' recipe's evaluation (non-augmented)
      transform: the shorter side is resized to `image_size / crop_fraction`
      and the central `image_size` square taken; in (0, 1]. None: 0.875
      (`IMAGENET_CROP_FRACTION`, 256 -> 224, the original's ResNet
      evaluation); 1.0: the shorter side straight to `image_size`, no crop
      margin (the original's EfficientNet evaluation).
    resize_method: the resampling of that transform, a name of
      `RESIZE_METHODS`: 'bilinear' (None or '': the default) or 'bicubic'
      (the original's EfficientNet evaluation).

  Returns:
    A list of grain transforms, uint8 HWC records in, images of the output
    size out (uint8, or float32 in [0, 1] after colour transforms).

  Raises:
    ValueError: unknown dataset, an `image_size` the recipe cannot give, a
      bad `crop_fraction` or `resize_method`, or either of them set for a
      recipe other than 'imagenet'.

  Example:
    >>> [type(op).__name__ for op in preprocess_ops('cifar10', train=True)]
    ['SelectFeatures', 'RandomCropFlip', 'ColorJitter', 'Cutout']
  """
  spec = datasets.get_spec(dataset)
  augment = train if augment is None else augment
  crop_fraction, resize_method = _eval_resize(spec, crop_fraction, resize_method)
  ops: list[Any] = [SelectFeatures()]
  if spec.image_shape is not None:
    if image_size not in (None, spec.image_shape[0]):
      raise ValueError(
        f'dataset {spec.name!r} has fixed {spec.image_shape[0]}-pixel images; '
        f'image_size must be None or {spec.image_shape[0]}, got {image_size}'
      )
  if spec.recipe == 'none':
    return ops
  if spec.recipe == 'cifar':
    if augment:
      mean = (normalization or spec.normalization)[0]
      ops += [
        RandomCropFlip(pad=4),
        ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.075),
        Cutout(size=16, fill=mean),
      ]
    return ops
  if spec.recipe == 'imagenet':
    size = DEFAULT_IMAGENET_SIZE if image_size is None else image_size
    if augment:
      ops.append(RandomResizedCrop(size))
    else:
      ops.append(ResizeCenterCrop(size, crop_fraction=crop_fraction, method=resize_method))
    return ops
  if spec.recipe == 'resize':
    if image_size is None:
      raise ValueError(f'dataset {spec.name!r} has images of varying size; pass image_size')
    return [*ops, Resize(image_size)]
  raise ValueError(f'no preprocessing recipe {spec.recipe!r} (dataset {spec.name!r})')


def _eval_resize(
  spec: datasets.DatasetSpec, crop_fraction: float | None, resize_method: str | None
) -> tuple[float, str]:
  """Checks the evaluation resize settings and fills in the defaults."""
  if resize_method == '':
    resize_method = None
  for name, value in (('crop_fraction', crop_fraction), ('resize_method', resize_method)):
    if value is not None and spec.recipe != 'imagenet':
      raise ValueError(
        f"{name}={value!r} applies only to datasets of the 'imagenet' recipe (resize and "
        f'central crop at evaluation); dataset {spec.name!r} has the recipe {spec.recipe!r}, '
        f'so leave {name} None'
      )
  crop_fraction = IMAGENET_CROP_FRACTION if crop_fraction is None else crop_fraction
  resize_method = DEFAULT_RESIZE_METHOD if resize_method is None else resize_method
  return check_crop_fraction(crop_fraction), check_resize_method(resize_method)
