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

The package's modules, each importing only those above it: `indices`
(`split_indices`, `IndexedSource`), `transforms` (the per-example grain
transforms and `NormalizeBatch`), `normalization` (`compute_normalization`,
`parse_normalization`), `recipes` (`preprocess_ops`), `pipeline`
(`create_split`, `ArrayBatchIterator`, `num_batches`). Everything public is
re-exported here: use `input_pipeline.X`.

Example:
  >>> source = datasets.get_data_source('cifar10', 'train')
  >>> train_idx, val_idx = split_indices(len(source), 5000)
  >>> it = create_split(source, batch_size=128, train=True, seed=0,
  ...                   dataset='cifar10', indices=train_idx)
  >>> batch = next(it)  # {'image': (128, 32, 32, 3) float32, 'label': (128,) int32}
  >>> state = it.get_state()  # bytes, for the checkpoint
"""

from ec2t_jax.training.datasets import Normalization
from ec2t_jax.training.input_pipeline.indices import IndexedSource, split_indices
from ec2t_jax.training.input_pipeline.normalization import (
  NORMALIZATION,
  NORMALIZATION_MAX_RECORDS,
  compute_normalization,
  normalization_names,
  parse_normalization,
)
from ec2t_jax.training.input_pipeline.pipeline import ArrayBatchIterator, create_split, num_batches
from ec2t_jax.training.input_pipeline.recipes import DEFAULT_IMAGENET_SIZE, preprocess_ops
from ec2t_jax.training.input_pipeline.transforms import (
  DEFAULT_RESIZE_METHOD,
  IMAGENET_CROP_FRACTION,
  RESIZE_METHODS,
  ColorJitter,
  Cutout,
  NormalizeBatch,
  RandomCropFlip,
  RandomResizedCrop,
  Resize,
  ResizeCenterCrop,
  SelectFeatures,
  check_crop_fraction,
  check_resize_method,
  hue_rotation_matrix,
)

__all__ = [
  'ArrayBatchIterator',
  'check_crop_fraction',
  'check_resize_method',
  'ColorJitter',
  'compute_normalization',
  'create_split',
  'Cutout',
  'DEFAULT_IMAGENET_SIZE',
  'DEFAULT_RESIZE_METHOD',
  'hue_rotation_matrix',
  'IMAGENET_CROP_FRACTION',
  'IndexedSource',
  'Normalization',
  'NORMALIZATION',
  'NORMALIZATION_MAX_RECORDS',
  'normalization_names',
  'NormalizeBatch',
  'num_batches',
  'parse_normalization',
  'preprocess_ops',
  'RandomCropFlip',
  'RandomResizedCrop',
  'Resize',
  'RESIZE_METHODS',
  'ResizeCenterCrop',
  'SelectFeatures',
  'split_indices',
]
