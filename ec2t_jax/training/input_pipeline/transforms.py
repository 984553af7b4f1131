"""Per-example grain transforms (numpy / PIL; uint8 HWC in, uint8 or float32 out).

Feature selection, the augmentations of the recipes (crop and flip, colour
jitter with a YIQ hue rotation, Cutout, random-resized crop), the evaluation
resizes, and the batch-level normalization `NormalizeBatch`.
"""

import math
import numbers
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import PIL.Image

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


class SelectFeatures(grain.transforms.Map):
  """Keeps 'image' (as a uint8 HWC array), 'label' and, if present, 'mask'."""

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    image = np.asarray(element['image'])
    if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
      # NormalizeBatch divides only uint8 by 255: a wider integer would be read as [0, 1].
      raise ValueError(
        f'a record holds a {image.dtype} image; the pipeline reads uint8 pixels (0..255) or '
        'float pixels on [0, 1]: make the data source return uint8 images'
      )
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
