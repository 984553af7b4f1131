"""Writes arrays in the layout `--config.dataset=npz:PATH` reads.

    python examples/make_npz.py /tmp/digits.npz                  # the embedded MNIST
    python examples/make_npz.py /tmp/fashion.npz --idx DIR       # MNIST-format idx files

`--idx DIR` reads the four gzipped idx files of MNIST or Fashion-MNIST
(`train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`, `t10k-...`), e.g.
Debian's `dataset-fashion-mnist` package (`/usr/share/datasets/fashion-mnist`).

Your own data needs the same four arrays: `x_train`, `y_train`, `x_test`,
`y_test`; images uint8, `(N, H, W)` or `(N, H, W, C)`; labels integers in
`[0, num_classes)`.
"""

import argparse
import gzip
import os

import numpy as np

from ec2t_jax.training import datasets

IDX_FILES = {
  'x_train': 'train-images-idx3-ubyte.gz',
  'y_train': 'train-labels-idx1-ubyte.gz',
  'x_test': 't10k-images-idx3-ubyte.gz',
  'y_test': 't10k-labels-idx1-ubyte.gz',
}


def read_idx(path: str) -> np.ndarray:
  """One gzipped idx file of unsigned bytes: images `(N, H, W)` or labels `(N,)`."""
  with gzip.open(path, 'rb') as f:
    data = f.read()
  if data[:2] != b'\0\0' or data[2] != 0x08:
    raise ValueError(f'{path!r} is not an idx file of unsigned bytes (magic {data[:4].hex()})')
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], 'big') for i in range(ndim))
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def main(argv=None) -> None:
  """Saves the train and test splits (the embedded MNIST, or `--idx DIR`) to the path."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('path', nargs='?', default='digits.npz', help='the .npz file to write')
  parser.add_argument('--idx', default='', help='a folder of MNIST-format .gz idx files')
  args = parser.parse_args(argv)
  if args.idx:
    arrays = {k: read_idx(os.path.join(args.idx, name)) for k, name in IDX_FILES.items()}
  else:
    data = datasets.load_embedded_mnist()
    (x_train, y_train), (x_test, y_test) = data['train'], data['test']
    arrays = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  np.savez(args.path, **arrays)
  print(
    f'wrote {args.path}: {len(arrays["x_train"])} training and {len(arrays["x_test"])} test images'
  )


if __name__ == '__main__':
  main()
