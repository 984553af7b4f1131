"""CIFAR-100 recipes: `:micronet` (default, the published C100-MicroNet), `:resnet20`, `:smoke`.

Values cite `docs/recipes.md`. For weights imported from the original implementation add
`--config.normalization=cifar10`: the original normalized CIFAR-100 with CIFAR-10's statistics.
"""

from ec2t_jax.configs import cifar10


def get_config(variant: str = 'micronet'):
  """CIFAR-100; `variant` in 'micronet', 'resnet20', 'smoke'."""
  variant = variant or 'micronet'
  config = cifar10.get_config(variant)
  config.dataset = 'cifar100'
  if variant == 'micronet':
    config.model = 'micronet_c100'
    config.ec2t.init_scale = 0.45  # recipes.md: the published C100-MicroNet run, s = 0.45.
    config.ec2t.gamma = 0.15
  return config
