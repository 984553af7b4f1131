"""LeNet-5 on the embedded MNIST: `configs/mnist.py` (the demo) and `configs/mnist.py:smoke`.

The recipe lives in the package as `ec2t_jax/configs/mnist.py` (an installed `ec2t-train`
finds it as `--config=mnist`); this file re-exports its `get_config` for
`--config=configs/mnist.py` and `from configs import mnist`.
"""

from ec2t_jax.configs.mnist import get_config

__all__ = ['get_config']
