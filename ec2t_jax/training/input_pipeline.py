"""grain input pipelines: per-recipe augmentation, sharding, padding, checkpointable.

`create_split` turns a random-access source (`ec2t_jax.training.datasets.get_data_source`)
into an iterator of numpy batches

  {'image': float32 (B, H, W, C), normalized, 'label': int32 (B,)}

(+ 'mask': bool (B,) for evaluation), built from a `grain.DataLoader` with an
`IndexSampler`, so that

* the order and every random augmentation are a pure function of `seed` and
  the record's position in the sampler: the same seed gives the same batches,
  whatever the number of reading threads. With worker processes
  (`worker_count > 0`) every record still gets the same augmentation, but
  each worker batches its own records, so the batch sequence depends on
  `worker_count`, and a saved state restores only with the same
  `worker_count`. (grain's workers read absl flags: run under `absl.app`.);
* each JAX process reads a disjoint shard (`shard_index`/`shard_count`);
* the iterator's position can be saved and restored: `it.get_state()` returns
  bytes, `it.set_state(state)` on a freshly created iterator with the same
  arguments resumes with the identical next batches (the trainer stores the
  bytes with orbax).

Augmentations are numpy (and PIL for ImageNet) grain transforms, per recipe:

* mnist: none; normalize with mean 0.1307, std 0.3081.
* cifar10 / cifar100 (docs/algorithm.md §8): random crop of the 4-pixel zero-padded image,
  horizontal flip, colour jitter (brightness, contrast, saturation 0.3, hue
  0.075, in a random order as torchvision does), Cutout of one 16x16 hole
  (DeVries & Taylor 2017, arXiv:1708.04552), per-channel normalization.
* imagenet2012: train random-resized crop (scale 0.08-1, ratio 3/4-4/3) and
  flip; eval resize of the shorter side to `image_size / crop_fraction`
  (default 0.875: 256 -> 224, the original's ResNet evaluation) and central
  crop, bilinear by default (`crop_fraction=1.0, resize_method='bicubic'`:
  the original's EfficientNet evaluation); ImageNet mean/std normalization.
* the user's data (`tfds:NAME`, `npz:/path`, `folder:/path`, see
  `ec2t_jax.training.datasets`): no augmentation (the right one depends on
  the data: a flip suits photographs, not digits); images of varying size
  (tfds) are resized to `image_size`; per-channel normalization computed
  from the training records (`compute_normalization`).

The recipe is the dataset spec's `recipe` ('none', 'cifar', 'imagenet',
'resize'); `normalization=` overrides the dataset's mean and std
(`parse_normalization` reads `config.normalization`: a pair, or the name of a
dataset whose statistics to use, e.g. 'cifar10' for CIFAR-100 runs from the
original's weights).

The validation set is held out from the 'train' split by index (`split_indices`):
train and validation pipelines read the same source through disjoint index sets.

Example:
  >>> source = datasets.get_data_source('cifar10', 'train')
  >>> train_idx, val_idx = split_indices(len(source), 5000)
  >>> it = create_split(source, batch_size=128, train=True, seed=0,
  ...                   dataset='cifar10', indices=train_idx)
  >>> batch = next(it)  # {'image': (128, 32, 32, 3) float32, 'label': (128,) int32}
  >>> state = it.get_state()  # bytes, for the checkpoint
"""

import ast
import hashlib
import json
import math
import numbers
import re
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
import PIL.Image

from ec2t_jax.training import datasets

Normalization = datasets.Normalization

# Per-channel mean and std of pixel values scaled to [0, 1] of the built-in datasets
# (their registry entries, `DatasetSpec.normalization`, are the source).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
  name: datasets.get_spec(name).normalization
  for name in ('mnist', 'cifar10', 'cifar100', 'imagenet2012')
}
# Records read by `compute_normalization` from a source that is not in memory.
NORMALIZATION_MAX_RECORDS = 10_000

DEFAULT_IMAGENET_SIZE = 224
# Evaluation of the 'imagenet' recipe: the shorter side is resized to
# `size / IMAGENET_CROP_FRACTION` (256 for 224, the original's ResNet evaluation),
# then the central `size` square is taken.
IMAGENET_CROP_FRACTION = 0.875
# PIL resampling filters by name (`resize_method` of `preprocess_ops`/`create_split`).
RESIZE_METHODS = {
  'bilinear': PIL.Image.Resampling.BILINEAR,
  'bicubic': PIL.Image.Resampling.BICUBIC,
}
DEFAULT_RESIZE_METHOD = 'bilinear'

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# RGB -> YIQ (FCC NTSC); the hue rotation is a rotation of the (I, Q) plane.
_RGB_TO_YIQ = np.array(
  [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float64
)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
_HUE_A0, _HUE_A1, _HUE_A2 = (
  (_YIQ_TO_RGB @ np.array(m, np.float64) @ _RGB_TO_YIQ).astype(np.float32)
  for m in (
    [[1, 0, 0], [0, 0, 0], [0, 0, 0]],
    [[0, 0, 0], [0, 1, 0], [0, 0, 1]],
    [[0, 0, 0], [0, 0, -1], [0, 1, 0]],
  )
)


# ----------------------------------------------------------------------------
# Indices: validation hold-out and the padded, masked evaluation source.
# ----------------------------------------------------------------------------


def split_indices(num_train: int, validation_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits the 'train' split's record indices into training and validation.

  The validation set is the *last* `validation_size` records (for the
  embedded MNIST, the last records of MNIST's original order; for tfds
  datasets, of tfds' fixed on-disk order), so it never changes with the seed.

  Args:
    num_train: number of records of the 'train' split.
    validation_size: number held out, `0 <= validation_size < num_train`
      (see `DatasetSpec.validation_size` for the recipes' values).

  Returns:
    `(train_indices, validation_indices)`, int64 arrays, disjoint, covering
    `range(num_train)`.

  Example:
    >>> split_indices(10, 3)
    (array([0, 1, 2, 3, 4, 5, 6]), array([7, 8, 9]))
  """
  if num_train <= 0:
    raise ValueError(f'num_train must be > 0, got {num_train}')
  if not 0 <= validation_size < num_train:
    raise ValueError(
      f'validation_size must be in [0, num_train={num_train}), got {validation_size}'
    )
  cut = num_train - validation_size
  return np.arange(cut, dtype=np.int64), np.arange(cut, num_train, dtype=np.int64)


class IndexedSource:
  """A view of a random-access source through an index array, optionally padded.

  `source[i]` returns the record `data_source[indices[i]]`. With `pad_to`,
  the view is extended to `pad_to` records by repeating the first one, and
  every record gets a 'mask' field: True for real records, False for padding.

  Its `repr` is stable (no object addresses, a digest of the indices), as
  grain checks it when an iterator state is restored.
  """

  def __init__(
    self,
    data_source: Any,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    pad_to: int | None = None,
  ):
    self._source = data_source
    if indices is None:
      indices = np.arange(len(data_source), dtype=np.int64)
    self._indices = np.asarray(indices, np.int64)
    if self._indices.ndim != 1:
      raise ValueError(f'indices must be 1-D, got shape {self._indices.shape}')
    if self._indices.size and (self._indices.min() < 0 or self._indices.max() >= len(data_source)):
      raise ValueError(
        f'indices must lie in [0, {len(data_source)}), got range '
        f'[{self._indices.min()}, {self._indices.max()}]'
      )
    if pad_to is not None and pad_to < self._indices.size:
      raise ValueError(f'pad_to={pad_to} is smaller than len(indices)={self._indices.size}')
    if pad_to is not None and pad_to > 0 and self._indices.size == 0:
      raise ValueError('cannot pad an empty index set')
    self._pad_to = pad_to
    self._num_real = self._indices.size
    digest = hashlib.sha1(self._indices.tobytes()).hexdigest()[:12]
    source_repr = repr(data_source)
    if ' at 0x' in source_repr or len(source_repr) > 200:  # not stable or not short
      source_repr = type(data_source).__name__
    self._repr = (
      f'IndexedSource(source={source_repr}, '
      f'num_real={self._num_real}, pad_to={pad_to}, indices_sha1={digest})'
    )

  def __len__(self) -> int:
    return self._num_real if self._pad_to is None else self._pad_to

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'index {index} out of range [0, {len(self)})')
    real = index < self._num_real
    record = dict(self._source[int(self._indices[index if real else 0])])
    if self._pad_to is not None:
      record['mask'] = real
    return record

  def __repr__(self) -> str:
    return self._repr


# ----------------------------------------------------------------------------
# Per-example transforms (numpy / PIL; uint8 HWC in, uint8 or float32 out).
# ----------------------------------------------------------------------------


class SelectFeatures(grain.transforms.Map):
  """Keeps 'image' (as a uint8 HWC array), 'label' and, if present, 'mask'."""

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    image = np.asarray(element['image'])
    if image.ndim == 2:
      image = image[..., None]
    out = {'image': image, 'label': element['label']}
    if 'mask' in element:
      out['mask'] = element['mask']
    return out


class RandomCropFlip(grain.transforms.RandomMap):
  """Random crop of the zero-padded image, then a horizontal flip with probability 1/2.

  Equivalent to torchvision's `RandomCrop(size, padding=pad)` followed by
  `RandomHorizontalFlip()`: the crop offset is uniform in `[0, 2 * pad]` on
  each axis of the image padded with `pad` black pixels on every side.
  """

  def __init__(self, pad: int = 4, flip: bool = True):
    if pad < 0:
      raise ValueError(f'pad must be >= 0, got {pad}')
    self.pad = pad
    self.flip = flip

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image = element['image']
    h, w, _ = image.shape
    p = self.pad
    # One call for all draws: a Generator call costs microseconds.
    u = rng.random(3)
    dy, dx = int(u[0] * (2 * p + 1)), int(u[1] * (2 * p + 1))
    # The part of the padded canvas that the crop sees is copied from the image.
    out = np.zeros_like(image)
    y0, x0 = dy - p, dx - p  # crop origin in image coordinates
    sy0, sy1 = max(y0, 0), min(y0 + h, h)
    sx0, sx1 = max(x0, 0), min(x0 + w, w)
    out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    if self.flip and u[2] < 0.5:
      out = out[:, ::-1]
    return {**element, 'image': np.ascontiguousarray(out)}


class ColorJitter(grain.transforms.RandomMap):
  """Random brightness, contrast, saturation and hue, in a random order.

  The factors are drawn as in torchvision's `ColorJitter`: brightness,
  contrast and saturation factors uniform in `[max(0, 1 - s), 1 + s]`, hue
  shift uniform in `[-hue, hue]` (fraction of a full turn), applied in a
  random permutation, each followed by clipping to [0, 1]:

    brightness  x ← b·x
    contrast    x ← c·x + (1 − c)·mean(gray(x))
    saturation  x ← s·x + (1 − s)·gray(x)
    hue         x ← YIQ⁻¹ · R(2π·h) · YIQ · x

  Hue is approximated by a rotation of the chroma plane (I, Q) of the YIQ
  colour space, one 3x3 matrix product per pixel, instead of torchvision's
  exact RGB → HSV → RGB round trip; both keep the luma and turn the hue by
  the same angle, and they differ slightly in saturation for strongly
  saturated colours, which is immaterial for a ±27° augmentation.

  Input uint8 (or float in [0, 1]); output float32 in [0, 1].
  """

  def __init__(
    self,
    brightness: float = 0.3,
    contrast: float = 0.3,
    saturation: float = 0.3,
    hue: float = 0.075,
  ):
    for name, value in (
      ('brightness', brightness),
      ('contrast', contrast),
      ('saturation', saturation),
    ):
      if value < 0:
        raise ValueError(f'{name} must be >= 0, got {value}')
    if not 0 <= hue <= 0.5:
      raise ValueError(f'hue must be in [0, 0.5], got {hue}')
    self.brightness = brightness
    self.contrast = contrast
    self.saturation = saturation
    self.hue = hue

  @staticmethod
  def _factor(u: float, strength: float) -> float:
    low = max(0.0, 1.0 - strength)
    return low + (1.0 + strength - low) * u

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    x = _to_unit_float(element['image'])
    if x.shape[-1] != 3:
      raise ValueError(f'ColorJitter needs RGB images, got shape {x.shape}')
    u = rng.random(8).tolist()
    order = sorted(range(4), key=u.__getitem__)  # a uniform random permutation
    b = self._factor(u[4], self.brightness)
    c = self._factor(u[5], self.contrast)
    s = self._factor(u[6], self.saturation)
    h = self.hue * (2.0 * u[7] - 1.0)
    for op in order:
      if op == 0 and self.brightness:
        x *= b
      elif op == 1 and self.contrast:
        mean = float((x @ _LUMA).mean())
        x *= c
        x += (1.0 - c) * mean
      elif op == 2 and self.saturation:
        gray = (x @ _LUMA)[..., None]
        x *= s
        x += (1.0 - s) * gray
      elif op == 3 and self.hue:
        x = x @ hue_rotation_matrix(h).T
      else:
        continue
      np.clip(x, 0.0, 1.0, out=x)
    return {**element, 'image': x}


def hue_rotation_matrix(turns: float) -> np.ndarray:
  """RGB → RGB matrix rotating the hue by `turns` of a full circle (via YIQ).

  `YIQ⁻¹ · R(θ) · YIQ` with `R(θ)` the rotation of the (I, Q) plane, expanded
  as `A0 + cos θ · A1 + sin θ · A2` with precomputed matrices.
  """
  theta = 2.0 * math.pi * turns
  return _HUE_A0 + math.cos(theta) * _HUE_A1 + math.sin(theta) * _HUE_A2


def _to_unit_float(image: np.ndarray) -> np.ndarray:
  if image.dtype == np.uint8:
    return image.astype(np.float32) * np.float32(1.0 / 255.0)
  return np.array(image, np.float32)


class Cutout(grain.transforms.RandomMap):
  """Fills one `size` x `size` square, centre uniform in the image, clipped at the borders.

  The original (DeVries & Taylor 2017) zeroes the hole *after*
  normalization, i.e. fills it with the dataset mean; `fill` (per channel,
  on the [0, 1] scale) reproduces that before normalization.

  Input float32 in [0, 1] (or uint8, converted); output float32.
  """

  def __init__(self, size: int = 16, fill: Sequence[float] = (0.0,)):
    if size < 0:
      raise ValueError(f'size must be >= 0, got {size}')
    self.size = size
    self.fill = np.asarray(fill, np.float32)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    x = _to_unit_float(element['image'])
    h, w = x.shape[:2]
    u = rng.random(2)
    cy, cx = int(u[0] * h), int(u[1] * w)
    half = self.size // 2
    y0, y1 = max(cy - half, 0), min(cy - half + self.size, h)
    x0, x1 = max(cx - half, 0), min(cx - half + self.size, w)
    x[y0:y1, x0:x1] = self.fill
    return {**element, 'image': x}


class RandomResizedCrop(grain.transforms.RandomMap):
  """Inception-style random crop resized to `size` x `size`, then a random flip.

  The crop's area is a fraction `U(scale)` of the image and its aspect ratio
  `exp(U(log ratio))`; up to 10 draws, else the central crop with the ratio
  clamped to `ratio` (the rule of torchvision's `RandomResizedCrop`).
  Resampling is PIL bilinear (antialiased when shrinking).
  """

  def __init__(
    self,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
  ):
    if size <= 0:
      raise ValueError(f'size must be > 0, got {size}')
    if not 0 < scale[0] <= scale[1] <= 1:
      raise ValueError(f'scale must satisfy 0 < min <= max <= 1, got {scale}')
    if not 0 < ratio[0] <= ratio[1]:
      raise ValueError(f'ratio must satisfy 0 < min <= max, got {ratio}')
    self.size = size
    self.scale = scale
    self.ratio = ratio
    self.flip = flip

  def _box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    area = height * width
    log_ratio = np.log(self.ratio)
    for _ in range(10):
      target = area * rng.uniform(*self.scale)
      aspect = np.exp(rng.uniform(*log_ratio))
      w = int(round(np.sqrt(target * aspect)))
      h = int(round(np.sqrt(target / aspect)))
      if 0 < w <= width and 0 < h <= height:
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < self.ratio[0]:
      w, h = width, int(round(width / self.ratio[0]))
    elif in_ratio > self.ratio[1]:
      w, h = int(round(height * self.ratio[1])), height
    else:
      w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image = element['image']
    box = self._box(image.shape[0], image.shape[1], rng)
    out = _pil_resize(image, (self.size, self.size), box)
    if self.flip and rng.random() < 0.5:
      out = np.ascontiguousarray(out[:, ::-1])
    return {**element, 'image': out}


class ResizeCenterCrop(grain.transforms.Map):
  """Resizes the shorter side to `round(size / crop_fraction)` and takes the central `size` crop.

  The standard ImageNet evaluation transform (`Resize(256)`, `CenterCrop(224)`
  for `size=224` and the default `crop_fraction` 0.875), done as one PIL
  resize of the corresponding box. `crop_fraction=1.0` resizes the shorter
  side straight to `size` (no crop margin; only a non-square image's longer
  side is cut). `method` is a name of `RESIZE_METHODS` ('bilinear', 'bicubic').
  """

  def __init__(
    self,
    size: int,
    crop_fraction: float = IMAGENET_CROP_FRACTION,
    method: str = DEFAULT_RESIZE_METHOD,
  ):
    if size <= 0:
      raise ValueError(f'size must be > 0, got {size}')
    self.size = size
    self.crop_fraction = check_crop_fraction(crop_fraction)
    self.method = check_resize_method(method)

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    image = element['image']
    height, width = image.shape[:2]
    short = round(self.size / self.crop_fraction)
    # Scale of the resize that brings the shorter side to `short`; the
    # central `size` square of the result, mapped back to the input.
    scale = short / min(height, width)
    crop = self.size / scale
    left = (width - crop) / 2
    top = (height - crop) / 2
    box = (left, top, left + crop, top + crop)
    out = _pil_resize(image, (self.size, self.size), box, RESIZE_METHODS[self.method])
    return {**element, 'image': out}


class Resize(grain.transforms.Map):
  """Resizes the whole image to `size` x `size` (PIL bilinear; the aspect ratio is not kept)."""

  def __init__(self, size: int):
    if size <= 0:
      raise ValueError(f'size must be > 0, got {size}')
    self.size = size

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    image = element['image']
    height, width = image.shape[:2]
    if (height, width) == (self.size, self.size):
      return element
    box = (0.0, 0.0, float(width), float(height))
    return {**element, 'image': _pil_resize(image, (self.size, self.size), box)}


def check_crop_fraction(crop_fraction: float) -> float:
  """Returns `crop_fraction` as a float if it lies in (0, 1], else raises a ValueError."""
  if (
    isinstance(crop_fraction, bool)
    or not isinstance(crop_fraction, numbers.Real)
    or not 0 < crop_fraction <= 1
  ):
    raise ValueError(
      f'crop_fraction must be a number in (0, 1] (e.g. {IMAGENET_CROP_FRACTION}, or 1.0 for '
      f'no crop margin), got {crop_fraction!r}'
    )
  return float(crop_fraction)


def check_resize_method(method: str) -> str:
  """Returns `method` if it names a filter of `RESIZE_METHODS`, else raises a ValueError."""
  if not isinstance(method, str) or method not in RESIZE_METHODS:
    raise ValueError(
      f'resize_method must be one of {", ".join(map(repr, RESIZE_METHODS))}, got {method!r}'
    )
  return method


def _pil_resize(
  image: np.ndarray,
  size: tuple[int, int],
  box: tuple[float, ...],
  resample: PIL.Image.Resampling = PIL.Image.Resampling.BILINEAR,
) -> np.ndarray:
  """Resize (bilinear by default) of the `box` (left, top, right, bottom) of a uint8 HWC image."""
  squeeze = image.shape[-1] == 1
  pil = PIL.Image.fromarray(image[..., 0] if squeeze else image)
  out = np.asarray(pil.resize(size, resample, box=box))
  return out[..., None] if squeeze else out


class NormalizeBatch(grain.transforms.Map):
  """Batch-level: image → float32 `(x − mean) / std` on the [0, 1] scale, label → int32.

  uint8 images are divided by 255 first; float images are taken as already
  on the [0, 1] scale. A 'mask' field is passed on as bool.
  """

  def __init__(self, mean: Sequence[float], std: Sequence[float]):
    if any(s <= 0 for s in std):
      raise ValueError(f'std must be > 0, got {std}')
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)

  def map(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
    image = batch['image']
    scale = np.float32(1.0 / 255.0) if image.dtype == np.uint8 else np.float32(1.0)
    inv_std = np.float32(1.0) / self.std
    x = image.astype(np.float32) * (scale * inv_std) - self.mean * inv_std
    out = {'image': x, 'label': np.asarray(batch['label'], np.int32)}
    if 'mask' in batch:
      out['mask'] = np.asarray(batch['mask'], bool)
    return out


# ----------------------------------------------------------------------------
# Recipes and the pipeline.
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# Normalization.
# ----------------------------------------------------------------------------


def compute_normalization(
  data_source: Any,
  indices: Sequence[int] | np.ndarray | None = None,
  *,
  max_records: int = NORMALIZATION_MAX_RECORDS,
  chunk_size: int = 4096,
) -> Normalization:
  """Per-channel mean and standard deviation of the pixel values (scaled to [0, 1]).

  Over every pixel of the records `indices` (default all) of `data_source`;
  the same numbers as `x.mean((0, 1, 2))` and `x.std((0, 1, 2))` of their
  stacked images `x / 255`, computed in float64 a chunk at a time. An
  `InMemorySource` is read whole; from any other source (files) at most
  `max_records` evenly spaced records are read, which may vary in size. A
  channel of zero spread gets std 1 (it is only centred).

  Args:
    data_source: random-access source of uint8 HWC images (`record['image']`).
    indices: the records to use, e.g. the training records without the
      validation ones (`split_indices`).
    max_records: the most records read from a source that is not in memory.
    chunk_size: records per vectorized step (in memory).

  Returns:
    `(mean, std)`, tuples of one Python float per channel.

  Raises:
    ValueError: for an empty set of records.

  Example:
    >>> train_idx, _ = split_indices(len(source), 500)
    >>> mean, std = compute_normalization(source, train_idx)
  """
  indices = np.arange(len(data_source)) if indices is None else np.asarray(indices, np.int64)
  if indices.size == 0:
    raise ValueError('cannot compute a normalization from no records')
  if isinstance(data_source, datasets.InMemorySource):
    chunks = (
      data_source.images[indices[i : i + chunk_size]] for i in range(0, indices.size, chunk_size)
    )
  else:
    if indices.size > max_records:
      indices = indices[np.linspace(0, indices.size - 1, max_records).round().astype(np.int64)]
    chunks = (np.asarray(SelectFeatures().map(data_source[int(i)])['image'])[None] for i in indices)
  total = squares = None
  count = 0
  for chunk in chunks:
    x = chunk.reshape(-1, chunk.shape[-1]).astype(np.float64) / 255.0
    total = x.sum(0) if total is None else total + x.sum(0)
    squares = (x * x).sum(0) if squares is None else squares + (x * x).sum(0)
    count += x.shape[0]
  mean = total / count
  std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
  std = np.where(std > 0, std, 1.0)
  return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def normalization_names() -> list[str]:
  """The registered datasets with statistics of their own: the names `parse_normalization` takes."""
  return sorted(name for name, spec in datasets.DATASETS.items() if spec.normalization is not None)


def parse_normalization(value: Any, channels: int) -> Normalization | None:
  """Reads a normalization setting (`config.normalization`): `(mean, std)` or None.

  Besides a pair of numbers, the setting can name a registered dataset with
  statistics of its own (`normalization_names()`: 'cifar10', 'cifar100',
  'imagenet2012', 'mnist', ...), whose statistics are then used.
  `config.normalization = 'cifar10'` is the setting for CIFAR-100 runs from
  imported original weights: the original implementation normalized
  CIFAR-100 with CIFAR-10's statistics.

  Args:
    value: '' / None / () (the dataset's own), a dataset name, a pair of
      per-channel sequences, or its text as written on a command line,
      e.g. '((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))'.
    channels: the images' channels; mean and std need one value per channel.

  Returns:
    `(mean, std)` as tuples of floats, or None for the dataset's own.

  Raises:
    ValueError: a name without statistics of its own, not a pair of
      `channels` numbers each, or a std that is not > 0.

  Example:
    >>> parse_normalization('[[0.5], [0.25]]', channels=1)
    ((0.5,), (0.25,))
    >>> parse_normalization('cifar10', channels=3) == datasets.get_spec('cifar10').normalization
    True
  """
  if value is None or (isinstance(value, (str, tuple, list)) and len(value) == 0):
    return None
  text = value
  expected = f'a pair (mean, std) of {channels} per-channel values each, e.g. ' + repr(
    str(((0.5,) * channels, (0.25,) * channels))
  )
  names = normalization_names()
  if isinstance(value, str) and re.fullmatch(r'[A-Za-z_][A-Za-z0-9_.-]*(:.*)?', value.strip()):
    name = value.strip()
    spec = datasets.DATASETS.get(name)
    if spec is None or spec.normalization is None:
      raise ValueError(
        f'config.normalization={text!r} names no dataset with statistics of its own; valid '
        f'names: {", ".join(names)}, or {expected}'
      )
    value = spec.normalization
  try:
    if isinstance(value, str):
      value = ast.literal_eval(value)
    mean, std = (tuple(float(v) for v in part) for part in value)
  except (ValueError, TypeError, SyntaxError):
    raise ValueError(
      f'config.normalization must be {expected}, or a dataset name ({", ".join(names)}); '
      f'got {text!r}'
    ) from None
  if len(mean) != channels or len(std) != channels:
    raise ValueError(
      f'config.normalization must be {expected}: the images have {channels} channels; got '
      f'{text!r} ({len(mean)} means, {len(std)} stds)'
    )
  if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
    raise ValueError(f'config.normalization needs finite means and stds > 0; got {text!r}')
  return mean, std


class ArrayBatchIterator:
  """Training batches of an in-memory source that needs no per-record transform.

  The fast path of `create_split` for MNIST-like data: each epoch is a fresh
  permutation (seeded by `(seed, epoch)`) cut into *global* batches of
  `batch_size * shard_count`; shard `i` takes the `i`-th slice of each, so the
  global batches are the same however many processes share them. Every batch
  is one numpy gather plus the batch normalization — about a hundred times
  faster than per-record processing. Batches never cross an epoch boundary
  (the remainder is dropped, as `num_batches` counts).
  `get_state()`/`set_state()` give JSON bytes, like grain's iterators.
  """

  def __init__(
    self,
    source: datasets.InMemorySource,
    indices: np.ndarray | None,
    *,
    batch_size: int,
    seed: int,
    shard_index: int,
    shard_count: int,
    num_epochs: int | None,
    normalize: NormalizeBatch,
  ):
    self._source = source
    self._indices = np.arange(len(source)) if indices is None else np.asarray(indices)
    self._global_batch = batch_size * shard_count
    self._batches = len(self._indices) // self._global_batch
    self._batch_size = batch_size
    self._seed = seed
    self._shard = shard_index
    self._num_epochs = num_epochs
    self._normalize = normalize
    self._epoch, self._position = 0, 0
    self._order_epoch, self._order = -1, None

  def _epoch_order(self) -> np.ndarray:
    if self._order_epoch != self._epoch:
      perm = np.random.default_rng([self._seed, self._epoch]).permutation(len(self._indices))
      self._order = self._indices[perm]
      self._order_epoch = self._epoch
    return self._order

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._num_epochs is not None and self._epoch >= self._num_epochs:
      raise StopIteration
    start = self._position * self._global_batch + self._shard * self._batch_size
    keys = self._epoch_order()[start : start + self._batch_size]
    batch = self._normalize.map(
      {'image': self._source.images[keys], 'label': self._source.labels[keys]}
    )
    self._position += 1
    if self._position == self._batches:
      self._epoch, self._position = self._epoch + 1, 0
    return batch

  def get_state(self) -> bytes:
    """The position as JSON bytes."""
    return json.dumps(
      {'epoch': self._epoch, 'position': self._position, 'seed': self._seed}
    ).encode()

  def set_state(self, state: bytes) -> None:
    """Continues from a `get_state()` of an iterator built with the same arguments."""
    value = json.loads(state)
    if value.get('seed') != self._seed:
      raise ValueError(f'iterator state was saved with seed {value.get("seed")}, not {self._seed}')
    self._epoch, self._position = int(value['epoch']), int(value['position'])


def num_batches(
  num_records: int, *, batch_size: int, train: bool, shard_count: int | None = None
) -> int:
  """Batches per epoch and per process that `create_split` yields for `num_records` records.

  Training drops the remainder (`(num_records // shard_count) // batch_size`);
  evaluation pads (`ceil(num_records / (batch_size * shard_count))`).
  """
  shard_count = jax.process_count() if shard_count is None else shard_count
  if train:
    return (num_records // shard_count) // batch_size
  return math.ceil(num_records / (batch_size * shard_count))


def _has_random_ops(ops: Sequence[Any]) -> bool:
  return any(isinstance(op, grain.transforms.RandomMap) for op in ops)


class _Chain(grain.transforms.Map):
  """Several per-example transforms as one grain operation (less per-record overhead)."""

  def __init__(self, ops: Sequence[Any]):
    self.ops = list(ops)

  def map(self, element):
    for op in self.ops:
      element = op.map(element)
    return element


class _RandomChain(grain.transforms.RandomMap):
  """As `_Chain`, with random transforms; they share the record's generator, in order.

  grain hands every `RandomMap` of a pipeline the same per-record generator,
  so chaining gives exactly the draws of the separate operations.
  """

  def __init__(self, ops: Sequence[Any]):
    self.ops = list(ops)

  def random_map(self, element, rng: np.random.Generator):
    for op in self.ops:
      if isinstance(op, grain.transforms.RandomMap):
        element = op.random_map(element, rng)
      else:
        element = op.map(element)
    return element


def create_split(
  data_source: Any,
  *,
  batch_size: int,
  train: bool,
  seed: int,
  dataset: str | datasets.DatasetSpec = 'cifar10',
  image_size: int | None = None,
  normalization: Normalization | None = None,
  indices: Sequence[int] | np.ndarray | None = None,
  shard_index: int | None = None,
  shard_count: int | None = None,
  num_epochs: int | None = None,
  augment: bool | None = None,
  worker_count: int = 0,
  read_threads: int | None = None,
  prefetch_buffer_size: int = 256,
  crop_fraction: float | None = None,
  resize_method: str | None = None,
) -> grain.DataLoaderIterator:
  """An iterator of batches of `data_source` with the recipe of `dataset`.

  Training: records (of `indices`, default all) are shuffled every epoch
  (seeded), augmented (if `augment`), batched with the remainder dropped,
  and repeated `num_epochs` times (forever if `None`); batches run across
  epoch boundaries. Evaluation: one pass in order, the record list padded to
  a multiple of `batch_size * shard_count` so that every process yields the
  same number of full batches and every real record appears exactly once
  with `mask == True` (padding has `mask == False`).

  Args:
    data_source: random-access source, e.g. `datasets.get_data_source(...)`.
    batch_size: examples per batch *of this process* (the global batch is
      `batch_size * shard_count`).
    train: training (shuffle, augment, drop remainder) or evaluation.
    seed: non-negative 32-bit seed of the shuffle and the augmentations.
    dataset: the dataset whose recipe and normalization apply: a name
      ('mnist', 'cifar10', 'cifar100', 'imagenet2012', 'npz:/path/data.npz',
      ...) or its `DatasetSpec`.
    image_size: output size for ImageNet (default 224) and for tfds data of
      varying image size.
    normalization: `(mean, std)` per channel on the [0, 1] scale; required
      for datasets without their own (the user's data: see
      `compute_normalization`), else overrides theirs.
    indices: the records of `data_source` to use (see `split_indices`).
    shard_index: this process's shard; default `jax.process_index()`.
    shard_count: number of shards; default `jax.process_count()`.
    num_epochs: training epochs to yield (`None`: forever). Evaluation is
      always one epoch.
    augment: random augmentations on or off; defaults to `train`.
    worker_count: grain worker processes (0: in this process).
    read_threads: threads reading records (ahead of the transforms) in each
      process; default 0 for an `InMemorySource` (threads only add GIL
      contention there), else 8 (file reads and parsing).
    prefetch_buffer_size: records read ahead per process.
    crop_fraction: crop margin of the 'imagenet' recipe's evaluation
      transform, in (0, 1]; None: 0.875 (256 -> 224); 1.0: no margin. See
      `preprocess_ops`. Must be None for other recipes.
    resize_method: resampling of that transform, 'bilinear' (None: the
      default) or 'bicubic'. Must be None for other recipes.

  Returns:
    A `grain.DataLoaderIterator` of dicts 'image' float32 `(B, H, W, C)`,
    'label' int32 `(B,)`, and for evaluation 'mask' bool `(B,)`. It has
    `get_state() -> bytes` and `set_state(bytes)`.

  Raises:
    ValueError: bad sizes, seed, shard or epoch arguments, unknown dataset,
      bad `crop_fraction` or `resize_method`.

  Example:
    >>> it = create_split(source, batch_size=128, train=False, seed=0, dataset='mnist')
    >>> for batch in it: ...  # batch['mask'] marks the real examples
  """
  if batch_size <= 0:
    raise ValueError(f'batch_size must be > 0, got {batch_size}')
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f'seed must be an integer in [0, 2**32), got {seed!r}')
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if shard_count <= 0 or not 0 <= shard_index < shard_count:
    raise ValueError(
      f'need 0 <= shard_index < shard_count, got shard_index={shard_index}, '
      f'shard_count={shard_count}'
    )
  if num_epochs is not None and num_epochs <= 0:
    raise ValueError(f'num_epochs must be None or > 0, got {num_epochs}')
  if not train and num_epochs not in (None, 1):
    raise ValueError(f'evaluation makes exactly one pass; got num_epochs={num_epochs}')
  if read_threads is None:
    read_threads = 0 if isinstance(data_source, datasets.InMemorySource) else 8
  spec = datasets.get_spec(dataset)
  if normalization is None and spec.normalization is None:
    raise ValueError(
      f'dataset {spec.name!r} has no normalization of its own; pass normalization=(mean, std), '
      'e.g. compute_normalization(data_source, indices)'
    )
  mean, std = normalization or spec.normalization
  ops = preprocess_ops(
    spec,
    train=train,
    augment=augment,
    image_size=image_size,
    normalization=normalization,
    crop_fraction=crop_fraction,
    resize_method=resize_method,
  )

  if train:
    source = IndexedSource(data_source, indices)
    if len(source) // shard_count < batch_size:
      raise ValueError(
        f'{len(source)} training records over {shard_count} shards cannot fill '
        f'one batch of {batch_size}'
      )
  else:
    num_real = len(data_source) if indices is None else len(indices)
    if num_real == 0:
      raise ValueError('cannot evaluate on an empty set of records')
    global_batch = batch_size * shard_count
    source = IndexedSource(
      data_source, indices, pad_to=math.ceil(num_real / global_batch) * global_batch
    )
  if (
    train
    and isinstance(data_source, datasets.InMemorySource)
    and worker_count == 0
    # Only recipes without any random transform, so that `augment` never changes the order.
    and all(
      isinstance(op, SelectFeatures)
      for op in preprocess_ops(spec, train=True, augment=True, image_size=image_size)
    )
  ):
    # No per-record work to do: gather whole batches with numpy instead.
    return ArrayBatchIterator(
      data_source,
      None if indices is None else np.asarray(indices, np.int64),
      batch_size=batch_size,
      seed=int(seed),
      shard_index=int(shard_index),
      shard_count=int(shard_count),
      num_epochs=num_epochs,
      normalize=NormalizeBatch(mean, std),
    )
  # Equal shards: each process must run the same number of steps.
  shard_options = grain.sharding.ShardOptions(
    shard_index=int(shard_index), shard_count=int(shard_count), drop_remainder=True
  )
  sampler = grain.samplers.IndexSampler(
    num_records=len(source),
    shard_options=shard_options,
    shuffle=train,
    num_epochs=num_epochs if train else 1,
    # Per-record generators cost ~10 µs each; only random transforms need them.
    seed=int(seed) if train or _has_random_ops(ops) else None,
  )
  loader = grain.DataLoader(
    data_source=source,
    sampler=sampler,
    operations=[
      _RandomChain(ops) if _has_random_ops(ops) else _Chain(ops),
      grain.transforms.Batch(batch_size=batch_size, drop_remainder=train),
      NormalizeBatch(mean, std),
    ],
    worker_count=worker_count,
    shard_options=shard_options,
    read_options=grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size
    ),
  )
  return iter(loader)
