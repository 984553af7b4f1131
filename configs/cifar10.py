"""CIFAR-10 recipes: `:resnet20` (default), `:micronet` (φ=3.5 super-network), `:smoke`.

The recipe lives in the package as `ec2t_jax/configs/cifar10.py` (an installed `ec2t-train`
finds it as `--config=cifar10`); this file re-exports its `get_config` for
`--config=configs/cifar10.py` and `from configs import cifar10`.
"""

from ec2t_jax.configs.cifar10 import get_config

__all__ = ['get_config']
