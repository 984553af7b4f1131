"""ImageNet recipes: `:efficientnet_b1` (default), `:resnet18`, `:smoke`.

The published runs compress pretrained networks, so these recipes have no
full-precision stage and refuse to start without
`--config.init_from=/path/weights.pth` (PyTorch: efficientnet_pytorch or
torchvision layout) or an orbax directory (`--config.needs_init_from=False`
compresses a random initialisation instead). Prepare the data once with
`tfds build imagenet2012 --file_format=array_record --manual_dir=...`.

Every value cites `docs/recipes.md`, which lists where it comes from; what
still differs from the original implementation is in `docs/differences.md`.
"""

import ml_collections

from ec2t_jax.configs import default

# docs/recipes.md, EfficientNet-B1: pass 1 ternarizes the 1x1 expand, project and head convs;
# pass 2 prunes the squeeze-excitation convs and the classifier (ECP) with pass 1 held fixed.
B1_TERNARY = r'(expand_conv|project_conv|conv_head)/kernel$'
B1_PRUNE = r'(se_reduce|se_expand|fc)/kernel$'
B1_DEPTHWISE = r'depthwise_conv/kernel$'


def _efficientnet_b1(config):
  config.model = 'efficientnet_b1'
  config.batch_size = 128  # recipes.md: batch 128 in both passes ...
  config.eval_batch_size = 256  # ... validation batch 256.
  config.image_size = 224  # recipes.md: training crop 224 ...
  config.eval_image_size = 240  # ... validation at the model's own 240,
  config.eval_resize_method = 'bicubic'  # recipes.md: bicubic resize, no crop margin.
  config.eval_crop_fraction = 1.0
  config.stages.ternarize = ml_collections.ConfigDict(
    {
      'kind': 'ec2t',
      'num_epochs': 20,
      'ternary_pattern': B1_TERNARY,
      'init_scale': 0.2,  # recipes.md: s = 0.2, γ = 0.125.
      'gamma': 0.125,
    }
  )
  config.stages.frozen = ml_collections.ConfigDict(
    {'kind': 'frozen', 'num_epochs': 15, 'start_from': 'best'}  # recipes.md: 15 frozen epochs.
  )
  config.stages.prune = ml_collections.ConfigDict(
    {
      'kind': 'ecp',
      'num_epochs': 10,  # recipes.md: 10 epochs, no frozen stage ...
      'start_from': 'best',  # ... from pass 1's best model, fresh optimizer state.
      'prune_pattern': B1_PRUNE,
      'init_scale': 0.25,  # recipes.md: s = 0.25, γ = 0.15.
      'gamma': 0.15,
    }
  )
  config.stage_order = 'ternarize,frozen,prune'
  # recipes.md: depthwise convs are magnitude-pruned at 1 % of each layer's max when the
  # finished network is scored and exported (the original's --prune-threshold 0.01).
  config.magnitude_prune.pattern = B1_DEPTHWISE
  config.magnitude_prune.fraction = 0.01
  config.score_image_size = 256  # recipes.md: scored at 256 (16-bit, the scoring default).
  return config


def get_config(variant: str = 'efficientnet_b1'):
  """ImageNet; `variant` in 'efficientnet_b1', 'resnet18', 'smoke'."""
  config = default.get_config()
  config.dataset = 'imagenet2012'
  config.batch_size = 256
  config.eval_batch_size = 250
  config.in_memory = False
  config.worker_count = 8
  config.needs_init_from = True  # Pretrained weights via init_from (no fp stage).
  config.fp.num_epochs = 0
  config.ec2t.num_epochs = 20  # recipes.md: 20 EC2T epochs, then frozen ones ...
  config.ec2t.frozen_epochs = 15
  config.ec2t.frozen_start_from = 'best'  # ... from the best EC2T checkpoint.
  config.log_every_steps = 200
  config.checkpoint_every_steps = 2000
  variant = variant or 'efficientnet_b1'
  if variant == 'efficientnet_b1':
    _efficientnet_b1(config)
  elif variant == 'resnet18':
    config.model = 'resnet18'
    config.image_size = 224  # recipes.md: train at 224, evaluate 256 -> 224 (the default).
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
    config.needs_init_from = False
    config.eval_image_size = 40  # Exercises a separate evaluation size and filter.
    config.eval_resize_method = 'bicubic'
    config.eval_crop_fraction = 1.0
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
