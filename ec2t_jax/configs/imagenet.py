"""ImageNet recipes: `:efficientnet_b1` (default, ternary + ECP), `:resnet18`, `:smoke`.

Both start from pretrained weights: `--config.init_from=/path/weights.pth` (PyTorch,
efficientnet_pytorch or torchvision layout) or an orbax directory. Prepare the data
once with `tfds build imagenet2012 --file_format=array_record --manual_dir=...`.
"""

from ec2t_jax.configs import default


def get_config(variant: str = 'efficientnet_b1'):
  """ImageNet; `variant` in 'efficientnet_b1', 'resnet18', 'smoke'."""
  config = default.get_config()
  config.dataset = 'imagenet2012'
  config.batch_size = 256
  config.eval_batch_size = 250
  config.in_memory = False
  config.worker_count = 8
  config.fp.num_epochs = 0  # Pretrained weights via init_from.
  config.ec2t.num_epochs = 20
  config.ec2t.frozen_epochs = 15
  config.log_every_steps = 200
  config.checkpoint_every_steps = 2000
  variant = variant or 'efficientnet_b1'
  if variant == 'efficientnet_b1':
    config.model = 'efficientnet_b1'
    config.image_size = 240
    # docs/algorithm.md §1: 1x1 expand, project and head convs are ternary; depthwise, SE and the
    # classifier get entropy-constrained pruning instead.
    config.ec2t.ternary_pattern = r'(expand_conv|project_conv|conv_head)/kernel$'
    config.ec2t.prune_pattern = r'(depthwise_conv|se_reduce|se_expand|fc)/kernel$'
  elif variant == 'resnet18':
    config.model = 'resnet18'
    config.image_size = 224
  elif variant == 'smoke':
    config.model = 'resnet18'
    config.image_size = 32
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_train_examples = 64
    config.validation_size = 16
    config.num_eval_examples = 16
    config.steps_per_epoch = 2
    config.worker_count = 0
    config.fp.num_epochs = 1
    config.fp.optimizer = 'sgd'
    config.fp.learning_rate = 0.01
    config.ec2t.num_epochs = 1
    config.ec2t.frozen_epochs = 1
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
  else:
    raise ValueError(
      f"unknown variant {variant!r} of configs/imagenet.py; valid: 'efficientnet_b1', "
      "'resnet18', 'smoke'"
    )
  return config
