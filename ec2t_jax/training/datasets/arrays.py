"""The user's data in numpy arrays: the checks that make their spec, and `npz:` files.

`npz:/path/data.npz` holds arrays `x_train`, `y_train`, `x_test`, `y_test`
(see the `ec2t_jax.training.datasets` docstring); `_array_spec` checks such
arrays (also those of `folder:` data) and makes their `DatasetSpec`.
"""

from __future__ import annotations

import functools
import logging
import os
import zipfile

import numpy as np

from ec2t_jax.training.datasets.registry import (
  DatasetSpec,
  _check_fixed_size,
  user_validation_size,
)


def _npz_spec(argument: str, *, data_dir: str, image_size: int | None) -> DatasetSpec:
  """The spec of `npz:/path/data.npz` (see the module docstring)."""
  del data_dir  # Not a tfds dataset.
  name = f'npz:{argument}'
  path = os.path.abspath(os.path.expanduser(argument))
  if not os.path.isfile(path):
    raise ValueError(
      f'dataset {name!r}: no such file {path!r}; give the path of a .npz file with arrays '
      'x_train, y_train, x_test, y_test'
    )
  stat = os.stat(path)
  return _npz_spec_cached(name, path, image_size, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _npz_spec_cached(name: str, path: str, image_size: int | None, *file_version) -> DatasetSpec:
  del file_version  # Only the cache's key: a rewritten file is read again.
  needed = ('x_train', 'y_train', 'x_test', 'y_test')
  if not zipfile.is_zipfile(path):
    raise ValueError(
      f'dataset {name!r}: {path!r} is not an .npz file (not a zip archive); write it with '
      'np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)'
    )
  try:
    with np.load(path, allow_pickle=False) as npz:
      found = sorted(npz.files)
      missing = [key for key in needed if key not in found]
      if missing:
        raise ValueError(
          f'dataset {name!r} lacks the arrays {missing}: the file has {found}, and needs '
          f'{list(needed)}; save it with np.savez(path, x_train=..., y_train=..., x_test=..., '
          'y_test=...)'
        )
      arrays = {key: npz[key] for key in needed}
  except ValueError as e:
    if str(e).startswith(f'dataset {name!r}'):
      raise
    raise ValueError(
      f'dataset {name!r}: cannot read {path!r} as .npz ({e}); store numeric arrays only'
    ) from None
  except Exception as e:  # noqa: BLE001 - zipfile, OSError, pickle: all mean a bad file.
    raise ValueError(
      f'dataset {name!r}: cannot read {path!r} as .npz ({type(e).__name__}: {e}); write it '
      'with np.savez'
    ) from None
  return _array_spec(
    name,
    {'train': (arrays['x_train'], arrays['y_train']), 'test': (arrays['x_test'], arrays['y_test'])},
    image_size=image_size,
  )


def _array_spec(
  name: str,
  splits: dict[str, tuple[np.ndarray, np.ndarray]],
  *,
  image_size: int | None,
  class_names: tuple[str, ...] | None = None,
) -> DatasetSpec:
  """Checks in-memory `{'train': (x, y), 'test': (x, y)}` and makes their spec."""
  checked = {}
  for split, (images, labels) in splits.items():
    x, y = f'x_{split}', f'y_{split}'
    if images.dtype != np.uint8:
      raise ValueError(
        f'dataset {name!r}: {x} has dtype {images.dtype}; images must be uint8 (0..255), e.g. '
        f'({x} * 255).round().astype(np.uint8) for values in [0, 1]'
      )
    if images.ndim not in (3, 4) or images.shape[0] == 0:
      raise ValueError(
        f'dataset {name!r}: {x} has shape {images.shape}; images must be a non-empty '
        '(N, H, W) or (N, H, W, C) array'
      )
    if labels.ndim != 1:
      raise ValueError(
        f'dataset {name!r}: {y} has shape {labels.shape}; labels must be 1-D (N,), e.g. {y}.ravel()'
      )
    if labels.dtype.kind not in 'iu':
      raise ValueError(
        f'dataset {name!r}: {y} has dtype {labels.dtype}; labels must be integer class ids '
        f'0..K-1 (e.g. {y}.astype(np.int64) if they are whole numbers)'
      )
    if labels.shape[0] != images.shape[0]:
      raise ValueError(
        f'dataset {name!r}: {x} holds {images.shape[0]} images but {y} holds '
        f'{labels.shape[0]} labels; give every image exactly one label'
      )
    # Checked as they will be used: after the cast (uint64 >= 2**63 would wrap negative).
    used = labels.astype(np.int64)
    if used.min() < 0:
      i = int(np.argmin(used))
      what = f'the negative label {labels[i]}' if labels[i] < 0 else f'the label {labels[i]}'
      wraps = '' if labels[i] < 0 else ', too large for int64'
      raise ValueError(
        f'dataset {name!r}: {y} holds {what} (index {i}){wraps}; labels must be class ids 0..K-1'
      )
    images = images[..., None] if images.ndim == 3 else images
    checked[split] = (images, used)
  (train_x, train_y), (test_x, _) = checked['train'], checked['test']
  if train_x.shape[1:] != test_x.shape[1:]:
    raise ValueError(
      f'dataset {name!r}: training images are {_hwc(train_x.shape[1:])} but test images '
      f'{_hwc(test_x.shape[1:])}; both splits need images of one shape'
    )
  num_classes = len(class_names) if class_names else int(train_y.max()) + 1
  if num_classes > train_y.shape[0]:  # A model of that many outputs, most of them never seen.
    i = int(np.argmax(train_y))
    raise ValueError(
      f'dataset {name!r}: y_train holds the label {train_y[i]} (index {i}), which makes '
      f'{num_classes} classes for {train_y.shape[0]} training examples; labels must be class '
      'ids 0..K-1 (renumber them, e.g. np.unique(y, return_inverse=True)[1])'
    )
  if len(np.unique(train_y)) < 2:
    logging.warning(
      'dataset %s: every training label is %d, so any network scores 100 %% on it; a '
      'classifier needs at least two classes',
      name,
      int(train_y[0]),
    )
  for split, (_, labels) in checked.items():
    if labels.max() >= num_classes:
      i = int(np.argmax(labels))
      raise ValueError(
        f'dataset {name!r}: y_{split} holds the label {labels[i]} (index {i}), out of range: '
        f'the training labels make {num_classes} classes, 0..{num_classes - 1}; every label '
        'must be a class id that the training split has'
      )
  if not class_names:
    missing = sorted(set(range(num_classes)) - set(np.unique(train_y).tolist()))
    logging.info(
      'dataset %s: %d classes (the largest training label + 1)%s',
      name,
      num_classes,
      f'; class ids {missing[:10]} have no training example' if missing else '',
    )
  _check_fixed_size(name, train_x.shape[1:], image_size)
  for images, labels in checked.values():
    images.flags.writeable = False
    labels.flags.writeable = False
  return DatasetSpec(
    name=name,
    tfds_name=None,
    num_classes=num_classes,
    image_shape=tuple(int(d) for d in train_x.shape[1:]),
    split_sizes={split: int(images.shape[0]) for split, (images, _) in checked.items()},
    test_split='test',
    validation_size=user_validation_size(train_x.shape[0]),
    channels=int(train_x.shape[-1]),
    class_names=class_names,
    arrays=checked,
  )


def _hwc(shape: tuple[int, ...]) -> str:
  return 'x'.join(str(d) for d in shape)
