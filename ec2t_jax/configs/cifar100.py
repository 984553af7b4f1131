"""CIFAR-100 recipes: `:micronet` (default, the published C100-MicroNet) and `:smoke`."""

from ec2t_jax.configs import cifar10


def get_config(variant: str = 'micronet'):
  """CIFAR-100; `variant` in 'micronet', 'resnet20', 'smoke'."""
  variant = variant or 'micronet'
  config = cifar10.get_config(variant)
  config.dataset = 'cifar100'
  if variant == 'micronet':
    config.model = 'micronet_c100'
  return config
