"""The network a file records: its model info, and a predictor built from it.

`run_model_info` is what `python -m ec2t_jax.export` records of a run, `model_info`
reads it back from a file and `load_predictor` turns such a file into a function.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from ec2t_jax.export.reader import _manifest, load

__all__ = ['MODEL_INFO_KEYS', 'load_predictor', 'model_info', 'run_model_info']

# What a file records about its network (all optional, so that older files still load):
# the model's registered name (or 'package.module:factory') and constructor keywords,
# the classifier's outputs, one input image's (height, width, channels), and the per-channel
# (mean, std) applied to images scaled to [0, 1].
MODEL_INFO_KEYS = ('name', 'kwargs', 'num_classes', 'input_shape', 'normalization', 'dataset')


def _check_model_info(model: Mapping[str, Any] | None) -> dict[str, Any] | None:
  """Validates `model` metadata for `dumps` (JSON-serializable, known keys)."""
  if model is None:
    return None
  unknown = sorted(set(model) - set(MODEL_INFO_KEYS))
  if unknown:
    raise ValueError(f'unknown model info keys {unknown}; valid: {list(MODEL_INFO_KEYS)}')
  out = dict(model)
  try:
    json.dumps(out)
  except (TypeError, ValueError) as e:
    raise ValueError(f'model info must be JSON-serializable: {e}') from e
  return out


def model_info(path: str) -> dict[str, Any] | None:
  """The network description a file records (`save(..., model=...)`), or None if it has none.

  The file is checked (magic, length, checksum) as by `load`.
  """
  with open(path, 'rb') as f:
    manifest = _manifest(f.read())
  info = manifest.get('model')
  if info is not None and not isinstance(info, dict):
    raise ValueError(f'corrupt manifest: model info is a {type(info).__name__}, not an object')
  return info


def load_predictor(path: str, *, dtype: Any = None) -> Callable[[Any], jax.Array]:
  """Turns a file with model info into a jitted function `images -> logits`.

  The file must record its network (`python -m ec2t_jax.export` writes that;
  `save(..., model=...)` in your own code). The function takes a batch of
  images as the run's dataset holds them, `(N, height, width, channels)` or
  `(N, height, width)`: uint8 pixels are divided by 255, float pixels must lie
  on [0, 1] (other dtypes are refused: their scale is ambiguous); then the
  run's normalization is applied and the network runs in eval mode (BatchNorm
  statistics from the file). Images must already have the
  recorded `input_shape` (resize/crop as the run's evaluation did).

  Args:
    path: an `.ec2t` file.
    dtype: compute dtype passed to the model (e.g. `jnp.bfloat16`); default float32.

  Returns:
    `predict(images) -> logits`, float32 `(N, num_classes)`; `predict.info` is the model info.

  Raises:
    ValueError: if the file records no model (older files) or is not a valid export;
      `predict` raises it for images of another shape, of an integer dtype other
      than uint8, or float images outside [0, 1]. An empty batch gives `(0, K)`.

  Example:
    >>> predict = load_predictor('lenet5.ec2t')  # doctest: +SKIP
    >>> logits = predict(mnist_test_images)       # doctest: +SKIP
  """
  import jax.numpy as jnp

  from ec2t_jax import models  # Local: flax only for this function.

  info = model_info(path)
  if not info or 'name' not in info or 'num_classes' not in info:
    raise ValueError(
      f'{path!r} records no model; export it with python -m ec2t_jax.export, or pass '
      "model={'name': ..., 'num_classes': ..., ...} to ec2t_jax.export.save"
    )
  variables = load(path)
  kwargs = dict(info.get('kwargs') or {})
  if dtype is not None:
    kwargs['dtype'] = dtype
  model = models.create(info['name'], num_classes=int(info['num_classes']), **kwargs)
  shape = tuple(info.get('input_shape') or ())
  mean, std = info.get('normalization') or ((0.0,), (1.0,))
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

  @jax.jit
  def apply(images):
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
      x = x * np.float32(1.0 / 255.0)
    if shape and x.ndim == len(shape):  # (N, H, W) grayscale: add the channel axis.
      x = x[..., None]
    return model.apply(variables, (x - mean) / std, train=False).astype(jnp.float32)

  def predict(images):
    images = _checked_pixels(images)
    if shape and tuple(images.shape[1:]) not in (shape, shape[:-1]):
      raise ValueError(f'images of shape {images.shape[1:]} given; the network takes {shape}')
    if images.shape[0] == 0:  # An empty batch has no logits to compute.
      return jnp.zeros((0, int(info['num_classes'])), jnp.float32)
    return apply(images)

  predict.info = info
  return predict


def _checked_pixels(images: Any) -> jax.Array:
  """`images` as an array, if its pixels mean what the training pipeline read.

  The pipeline reads uint8 pixels (0..255) and divides them by 255; other
  integer dtypes (int64, int32, uint16, bool, ...) have no one meaning (0..255
  widened, or 16-bit depth), so they are refused rather than guessed. Float
  pixels must already be on [0, 1] (`uint8 / 255`).

  Raises:
    ValueError: one line naming the dtype or the value range and the fix.
  """
  import jax.numpy as jnp

  if not hasattr(images, 'dtype'):
    images = np.asarray(images)
  dtype = images.dtype  # Before jnp.asarray, which narrows int64 to int32 without x64.
  images = jnp.asarray(images)
  if dtype == jnp.uint8:
    return images
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f'images of dtype {dtype}: the network was trained on uint8 pixels (0..255, divided '
      'by 255); pass uint8 (e.g. images.astype(np.uint8) when they hold 0..255) or float '
      'pixels on [0, 1]'
    )
  if images.size:
    inside = jnp.all((images >= 0) & (images <= 1))  # False for NaN too.
    lo, hi, ok = jax.device_get((jnp.nanmin(images), jnp.nanmax(images), inside))
    if not ok:
      nan = ' and NaN' if bool(jnp.any(jnp.isnan(images))) else ''
      raise ValueError(
        f'float images hold values in [{float(lo):g}, {float(hi):g}]{nan}; float pixels must be '
        'on [0, 1] (uint8 pixels / 255) as the network was trained: divide 0..255 pixels by '
        '255, or pass uint8'
      )
  return images


def run_model_info(run: Any) -> dict[str, Any]:
  """The `model` metadata of a run read by `ec2t_jax.training.workdir.load_workdir`."""
  kwargs = run.config.get('model_kwargs') or {}
  kwargs = kwargs.to_dict() if hasattr(kwargs, 'to_dict') else dict(kwargs)
  info = {
    'name': run.config.model,
    'kwargs': kwargs,
    'num_classes': int(run.num_classes),
    'input_shape': [int(d) for d in run.image_shape],
    'dataset': run.config.dataset,
  }
  if run.normalization is not None:
    info['normalization'] = [list(run.normalization[0]), list(run.normalization[1])]
  return info
