"""The user's images in a folder (`folder:/path`): one sub-folder per class, read with PIL.

See `load_image_folder` for the rules.
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np

from ec2t_jax.training.datasets.arrays import _array_spec, _hwc
from ec2t_jax.training.datasets.registry import _RESIZE_HINT, DatasetSpec, _check_fixed_size

# Every `FOLDER_TEST_EVERY`-th image of a class (in file name order) is the held-out
# test split of a `folder:` dataset without a test/ sub-folder.
FOLDER_TEST_EVERY = 5
IMAGE_EXTENSIONS = (
  '.bmp',
  '.gif',
  '.jpeg',
  '.jpg',
  '.pgm',
  '.png',
  '.ppm',
  '.tif',
  '.tiff',
  '.webp',
)
# PIL modes read as one grey channel; every other mode is converted to RGB.
_GRAY_MODES = ('1', 'L', 'LA', 'I;16', 'I;16B', 'I;16L', 'I;16N')
# 32-bit integer and float pixels: no fixed range, so no one way to make them 8-bit.
_UNSCALED_MODES = ('I', 'F')


def _list_images(directory: str) -> list[str]:
  """The image files of `directory` (by extension, not hidden), sorted by name."""
  return [
    os.path.join(directory, entry)
    for entry in sorted(os.listdir(directory))
    if not entry.startswith('.')
    and entry.lower().endswith(IMAGE_EXTENSIONS)
    and os.path.isfile(os.path.join(directory, entry))
  ]


def _class_folders(directory: str) -> list[str]:
  return sorted(
    entry
    for entry in os.listdir(directory)
    if not entry.startswith('.') and os.path.isdir(os.path.join(directory, entry))
  )


def _folder_layout(root: str, name: str) -> tuple[list[str], dict[str, list[str]], bool]:
  """`(class names, {split: [(class id, file)]...}, test held out)` of an image folder."""
  if not os.path.isdir(root):
    raise ValueError(
      f'dataset {name!r}: {root!r} is not a folder; give a folder that holds one sub-folder '
      'of images per class'
    )
  has_train, has_test = (os.path.isdir(os.path.join(root, s)) for s in ('train', 'test'))
  if has_test and not has_train:
    raise ValueError(
      f'dataset {name!r} has a test/ folder but no train/ folder; put the training images '
      f'in {os.path.join(root, "train", "<class>")}/'
    )
  train_root = os.path.join(root, 'train') if has_train else root
  classes = _class_folders(train_root)
  if not classes:
    raise ValueError(
      f'dataset {name!r}: {train_root!r} holds no class folders; it must hold one sub-folder '
      f'of images per class, e.g. {os.path.join(train_root, "cat", "001.png")}'
    )
  files = {c: _list_images(os.path.join(train_root, c)) for c in classes}
  for c in classes:
    if not files[c]:
      raise ValueError(
        f'dataset {name!r}: the class folder {os.path.join(train_root, c)!r} holds no images '
        f'({" ".join(IMAGE_EXTENSIONS)}); add images or remove the folder'
      )
  if has_test:
    test_root = os.path.join(root, 'test')
    unknown = sorted(set(_class_folders(test_root)) - set(classes))
    if unknown:
      raise ValueError(
        f'dataset {name!r}: test/ has class folders {unknown} that train/ lacks; the classes '
        f'are those of train/: {classes}'
      )
    test = {c: _list_images(os.path.join(test_root, c)) for c in _class_folders(test_root)}
    split_files = {
      'train': [(classes.index(c), f) for c in classes for f in files[c]],
      'test': [(classes.index(c), f) for c in test for f in test[c]],
    }
    if not split_files['test']:
      raise ValueError(
        f'dataset {name!r}: {test_root!r} holds no images; put test images in its class '
        'folders, or remove it to hold out a test split from the training images'
      )
    return classes, split_files, False
  every = FOLDER_TEST_EVERY
  held = {c: set(files[c][every - 1 :: every]) for c in classes}
  split_files = {
    'train': [(k, f) for k, c in enumerate(classes) for f in files[c] if f not in held[c]],
    'test': [(k, f) for k, c in enumerate(classes) for f in files[c][every - 1 :: every]],
  }
  if not split_files['test']:
    raise ValueError(
      f'dataset {name!r}: too few images to hold out a test split (every {every}th image of '
      f'each class); add a test/ folder, or at least {every} images to a class'
    )
  return classes, split_files, True


def _image_error(name: str, path: str, error: Exception) -> ValueError:
  return ValueError(
    f'dataset {name!r}: cannot read the image {path!r} ({type(error).__name__}: {error}); '
    'remove or replace the file'
  )


def load_image_folder(
  path: str | os.PathLike, *, image_size: int | None = None, name: str | None = None
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[str, ...], bool]:
  """Reads a folder of images, one sub-folder per class, into numpy arrays.

  The rules of `folder:/path` datasets:

  * classes are the sub-folders (hidden ones skipped), sorted by name; their
    position in that order is the label;
  * with `train/` (and optionally `test/`) sub-folders, the classes are those
    of `train/`, and `test/` holds the test images in folders of the same
    names (a class may lack test images);
  * without `test/`, the test split is held out deterministically: every
    fifth image (the 5th, 10th, ...) of each class in file name order;
  * images are the files with the extensions of `IMAGE_EXTENSIONS` (others
    are ignored), decoded with PIL; if every image is grey (PIL modes 1, L,
    LA, I;16) they have one channel, else all are converted to RGB (alpha is
    dropped); 16-bit grey pixels are scaled to 8 bits (`v·255/65535`), and
    32-bit integer or float images (modes I, F) are refused (no known range);
  * all images must have one size, unless `image_size` is given: then every
    image is resized (bilinear, aspect ratio not kept) to
    `image_size x image_size`;
  * the training records are put in a fixed pseudo-random order (seed 0),
    so that the validation set (the last training records) mixes the
    classes; test records are in class, then file name order.

  Everything is held in memory: this is meant for small folders.

  Args:
    path: the folder.
    image_size: the side images of mixed sizes are resized to; None: refuse
      mixed sizes.
    name: the dataset's name in error messages (default 'folder:<path>').

  Returns:
    `({'train': (images, labels), 'test': (images, labels)}, class names,
    test held out)`, images uint8 `(N, H, W, C)` and labels int64 `(N,)`.

  Raises:
    ValueError: not a folder, no class folders, a class folder without
      images, an unreadable image (named), mixed sizes without
      `image_size`, too few images to hold out a test split.

  Example:
    >>> splits, classes, held_out = load_image_folder('/data/flowers', image_size=64)
    >>> splits['train'][0].shape, classes
    ((1200, 64, 64, 3), ('daisy', 'rose', 'tulip'))
  """
  root = os.path.abspath(os.path.expanduser(os.fspath(path)))
  name = name or f'folder:{path}'
  classes, split_files, held_out = _folder_layout(root, name)
  version = tuple(
    (f, s.st_mtime_ns, s.st_size)
    for files in split_files.values()
    for _, f in files
    for s in [os.stat(f)]
  )
  splits = _read_folder(name, tuple(classes), _freeze(split_files), image_size, version)
  return splits, tuple(classes), held_out


def _freeze(split_files: dict[str, list[tuple[int, str]]]) -> tuple:
  return tuple((split, tuple(files)) for split, files in split_files.items())


@functools.lru_cache(maxsize=4)
def _read_folder(name, classes, split_files, image_size, version):
  """Decodes the images of a `_folder_layout` (cached while the files are unchanged)."""
  del classes, version  # Only the cache's key.
  import PIL.Image  # noqa: PLC0415 - only image folders need PIL here.

  headers = {}
  for _, files in split_files:
    for _, path in files:
      try:
        with PIL.Image.open(path) as image:
          headers[path] = (image.mode, image.size)
      except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad file.
        raise _image_error(name, path, e) from None
      if headers[path][0] in _UNSCALED_MODES:
        raise ValueError(
          f'dataset {name!r}: {path!r} has 32-bit {"float" if headers[path][0] == "F" else "int"}'
          f' pixels (PIL mode {headers[path][0]}), whose range is unknown; the pipeline reads '
          '8-bit pixels (0..255): save the image with 8 (or 16) bits per channel'
        )
  mode = 'L' if all(m in _GRAY_MODES for m, _ in headers.values()) else 'RGB'
  sizes = {}
  for path, (_, size) in headers.items():
    sizes.setdefault(size, path)
  if len(sizes) > 1 and image_size is None:
    (s1, p1), (s2, p2) = list(sizes.items())[:2]
    raise ValueError(
      f'dataset {name!r} has images of mixed sizes ({p1!r} is {s1[0]}x{s1[1]}, {p2!r} is '
      f'{s2[0]}x{s2[1]}); {_RESIZE_HINT}'
    )
  if len(sizes) == 1:
    (width, height), _ = next(iter(sizes.items()))
    _check_fixed_size(name, (height, width), image_size)
  out = {}
  for split, files in split_files:
    images = []
    for _, path in files:
      try:
        with PIL.Image.open(path) as image:
          image = _eight_bit(image).convert(mode)
          if image_size is not None and image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), PIL.Image.Resampling.BILINEAR)
          images.append(np.asarray(image, np.uint8))
      except Exception as e:  # noqa: BLE001 - decoding errors show only here.
        raise _image_error(name, path, e) from None
    labels = np.array([label for label, _ in files], np.int64)
    images = np.stack(images)
    if images.ndim == 3:  # Grey: one channel.
      images = images[..., None]
    if split == 'train':
      order = np.random.default_rng(0).permutation(len(labels))
      images, labels = images[order], labels[order]
    out[split] = (images, labels)
  return out


def _eight_bit(image):
  """`image` with 8-bit pixels: 16-bit grey (PIL `I;16*`) scaled by 255/65535, not clipped.

  PIL's own `convert('L')` clips 16-bit values at 255, which turns most of a
  16-bit image white.
  """
  if not image.mode.startswith('I;16'):
    return image
  import PIL.Image  # noqa: PLC0415

  wide = np.asarray(image).astype(np.uint32)
  return PIL.Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), 'L')


def _folder_spec(argument: str, *, data_dir: str, image_size: int | None) -> DatasetSpec:
  """The spec of `folder:/path` (see `load_image_folder`)."""
  del data_dir  # Not a tfds dataset.
  name = f'folder:{argument}'
  splits, classes, held_out = load_image_folder(argument, image_size=image_size, name=name)
  spec = _array_spec(name, splits, image_size=None, class_names=classes)
  logging.info(
    '%s: %d training and %d test images of %d classes, %s%s',
    name,
    spec.split_sizes['train'],
    spec.split_sizes['test'],
    spec.num_classes,
    _hwc(spec.image_shape),
    f'; test split held out: every {FOLDER_TEST_EVERY}th image of each class' if held_out else '',
  )
  return spec
