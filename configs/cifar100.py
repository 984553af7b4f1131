"""CIFAR-100 recipes: `:micronet` (default, the published C100-MicroNet) and `:smoke`.

The recipe lives in the package as `ec2t_jax/configs/cifar100.py` (an installed `ec2t-train`
finds it as `--config=cifar100`); this file re-exports its `get_config` for
`--config=configs/cifar100.py` and `from configs import cifar100`.
"""

from ec2t_jax.configs.cifar100 import get_config

__all__ = ['get_config']
