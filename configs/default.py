"""Base configuration (every field the training program reads).

The recipe lives in the package as `ec2t_jax/configs/default.py` (an installed `ec2t-train`
finds it as `--config=default`); this file re-exports its `get_config` for
`--config=configs/default.py` and `from configs import default`.
"""

from ec2t_jax.configs.default import get_config

__all__ = ['get_config']
