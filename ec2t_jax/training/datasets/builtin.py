"""The registry's built-in entries: mnist, cifar10, cifar100, imagenet2012, and the
`tfds:`, `npz:` and `folder:` forms.

Imported by `ec2t_jax.training.datasets`, which registers them on import.
"""

from __future__ import annotations

from ec2t_jax.training.datasets.arrays import _npz_spec
from ec2t_jax.training.datasets.embedded import MNIST_TFDS_NAME
from ec2t_jax.training.datasets.folder import _folder_spec
from ec2t_jax.training.datasets.registry import DatasetSpec, Normalization, register
from ec2t_jax.training.datasets.tfds_source import _tfds_spec

register(
  'mnist',
  DatasetSpec(
    name='mnist',
    tfds_name=MNIST_TFDS_NAME,
    num_classes=10,
    image_shape=(28, 28, 1),
    split_sizes={'train': 60_000, 'test': 10_000},
    test_split='test',
    validation_size=5_000,
    embedded=True,
    normalization=((0.1307,), (0.3081,)),
    recipe='none',
    channels=1,
  ),
)
# CIFAR-10's statistics are the original implementation's (d-becking/efficientCNNs
# normalizes with mean (125.3, 123.0, 113.9) / 255 and std (63.0, 62.1, 66.7) / 255), so
# that imported original weights see the inputs they were trained on. CIFAR-100 keeps its
# own statistics; the original normalized CIFAR-100 with CIFAR-10's, which
# `config.normalization = 'cifar10'` selects (see
# `ec2t_jax.training.input_pipeline.parse_normalization`).
CIFAR10_NORMALIZATION: Normalization = (
  (125.3 / 255, 123.0 / 255, 113.9 / 255),
  (63.0 / 255, 62.1 / 255, 66.7 / 255),
)
CIFAR100_NORMALIZATION: Normalization = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
for _name, _classes, (_mean, _std) in (
  ('cifar10', 10, CIFAR10_NORMALIZATION),
  ('cifar100', 100, CIFAR100_NORMALIZATION),
):
  register(
    _name,
    DatasetSpec(
      name=_name,
      tfds_name=_name,
      num_classes=_classes,
      image_shape=(32, 32, 3),
      split_sizes={'train': 50_000, 'test': 10_000},
      test_split='test',
      validation_size=5_000,
      normalization=(_mean, _std),
      recipe='cifar',
    ),
  )
del _name, _classes, _mean, _std
register(
  'imagenet2012',
  DatasetSpec(
    name='imagenet2012',
    tfds_name='imagenet2012',
    num_classes=1000,
    image_shape=None,
    split_sizes={'train': 1_281_167, 'validation': 50_000},
    test_split='validation',
    validation_size=10_000,
    normalization=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    recipe='imagenet',
  ),
)
register('tfds', _tfds_spec, usage='tfds:NAME')
register('npz', _npz_spec, usage='npz:/path/data.npz')
register('folder', _folder_spec, usage='folder:/path/to/images')
