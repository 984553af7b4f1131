"""What identifies a run's data, cheaply: recorded at the claim, compared on every resume.

A workdir records the fingerprint of the data it trains on (`WORKDIR/data.json`,
see `ec2t_jax.training.workdir.claim_workdir`); a resume on other data is
refused instead of continuing with the old iterator position on new records.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from ec2t_jax.training.datasets.embedded import EMBEDDED_MNIST_SHA256
from ec2t_jax.training.datasets.registry import DatasetSpec


def fingerprint(spec: DatasetSpec) -> dict[str, Any]:
  """The fingerprint of a dataset: its name, classes, image shape, split sizes and content.

  The content is a sha256 over the arrays of data held in memory (`npz:`,
  `folder:` after decoding and resizing: what the pipeline reads), the
  package's checksum for the embedded MNIST, and for tfds datasets their
  builder name and version with the prepared split sizes (hashing the records
  would mean reading them all).

  Example:
    >>> fingerprint(get_spec('mnist'))['num_classes']  # doctest: +SKIP
    10
  """
  out: dict[str, Any] = {
    'dataset': spec.name,
    'num_classes': int(spec.num_classes),
    'image_shape': [int(d) for d in spec.image_shape] if spec.image_shape else None,
    'split_sizes': {k: int(v) for k, v in sorted(spec.split_sizes.items())},
  }
  if spec.arrays is not None:
    digest = hashlib.sha256()
    for split in sorted(spec.arrays):
      for array in spec.arrays[split]:
        digest.update(f'{split} {array.dtype} {array.shape};'.encode())
        digest.update(np.ascontiguousarray(array).data)
    out['sha256'] = digest.hexdigest()
  elif spec.embedded:
    out['sha256'] = EMBEDDED_MNIST_SHA256
  else:
    out['tfds'] = spec.tfds_name
    if spec.version:
      out['version'] = spec.version
  return out
