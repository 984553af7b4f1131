"""Writes arrays in the layout `--config.dataset=npz:PATH` reads (here: the embedded MNIST).

    python examples/make_npz.py /tmp/digits.npz

Your own data needs the same four arrays: `x_train`, `y_train`, `x_test`,
`y_test`; images uint8, `(N, H, W)` or `(N, H, W, C)`; labels integers in
`[0, num_classes)`.
"""

import sys

import numpy as np

from ec2t_jax.training import datasets


def main(path: str) -> None:
  """Saves the embedded MNIST's train and test splits to `path`."""
  data = datasets.load_embedded_mnist()
  (x_train, y_train), (x_test, y_test) = data['train'], data['test']
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  print(f'wrote {path}: {len(x_train)} training and {len(x_test)} test images')


if __name__ == '__main__':
  main(sys.argv[1] if len(sys.argv) > 1 else 'digits.npz')
