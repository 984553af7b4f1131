"""ImageNet recipes: `:efficientnet_b1` (default, ternary + ECP), `:resnet18`, `:smoke`.

The recipe lives in the package as `ec2t_jax/configs/imagenet.py` (an installed `ec2t-train`
finds it as `--config=imagenet`); this file re-exports its `get_config` for
`--config=configs/imagenet.py` and `from configs import imagenet`.
"""

from ec2t_jax.configs.imagenet import get_config

__all__ = ['get_config']
