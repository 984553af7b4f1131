"""CIFAR-10 recipes: `:resnet20` (default), `:micronet` (φ=3.5 super-network), `:smoke`.

Prepare the data once: `tfds build cifar10 --file_format=array_record` (needs TensorFlow).
Both train their full-precision network first (`--config.fp.num_epochs=0
--config.init_from=<pretrained>` skips that). Every value cites `docs/recipes.md`;
what still differs from the original implementation is in `docs/differences.md`.
"""

from ec2t_jax.configs import default


def _common(config):
  config.dataset = 'cifar10'
  config.batch_size = 128
  config.eval_batch_size = 500
  # Full-precision recipe (docs/algorithm.md §8): SGD Nesterov 0.1, momentum 0.9, wd 5e-4, cosine.
  config.fp.optimizer = 'sgd'
  config.fp.learning_rate = 0.1
  config.fp.momentum = 0.9
  config.fp.nesterov = True
  config.fp.weight_decay = 5e-4
  config.fp.schedule = 'cosine'
  # recipes.md: EC2T batch 128, s = 0.3 and γ = 0.15 (the original's defaults), and the
  # frozen stage from the best EC2T checkpoint.
  config.ec2t.init_scale = 0.3
  config.ec2t.gamma = 0.15
  config.ec2t.frozen_start_from = 'best'
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  return config


def get_config(variant: str = 'resnet20'):
  """CIFAR-10; `variant` in 'resnet20', 'micronet', 'smoke'."""
  config = _common(default.get_config())
  variant = variant or 'resnet20'
  if variant == 'resnet20':
    config.model = 'resnet20'
    config.fp.num_epochs = 200  # recipes.md (ours: the original shipped pretrained weights).
    config.ec2t.num_epochs = 20  # recipes.md: 20 EC2T + 15 frozen epochs.
    config.ec2t.frozen_epochs = 15
  elif variant == 'micronet':
    config.model = 'micronet_c10'  # d=1.4, w=1.2, φ=3.5: 23 blocks/stage, 32/64/120.
    config.fp.num_epochs = 250  # recipes.md: 250 epochs from scratch.
    config.ec2t.num_epochs = 20  # recipes.md: 20 EC2T + 20 frozen epochs.
    config.ec2t.frozen_epochs = 20
  elif variant == 'smoke':
    config.model = 'resnet20'
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_train_examples = 64  # tfds.testing.mock_data leaves info.splits empty.
    config.validation_size = 16
    config.num_eval_examples = 16
    config.steps_per_epoch = 2
    config.fp.num_epochs = 1
    config.ec2t.num_epochs = 1
    config.ec2t.frozen_epochs = 1
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.in_memory = False
  else:
    raise ValueError(
      f"unknown variant {variant!r} of configs/cifar10.py; valid: 'resnet20', 'micronet', 'smoke'"
    )
  return config
