"""LeNet-5 for 28x28 grayscale images (MNIST).

LeCun, Bottou, Bengio & Haffner, "Gradient-Based Learning Applied to Document
Recognition", Proc. IEEE 1998; the variant with ReLU and max pooling used by the
EC2T MNIST experiments (Marban et al., CVPR-W 2020, arXiv 2004.01077).
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ec2t_jax.models import layers

__all__ = ['LeNet5']

# PyTorch's default init for Conv2d/Linear (kaiming_uniform with a=sqrt(5)) is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance 1/(3·fan_in); kept so that
# training from scratch behaves like the original.
_torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


class LeNet5(nn.Module):
  """LeNet-5: two 5x5 convolutions with max pooling, then three dense layers.

  ``conv1`` (6@5x5, pad 2) → ReLU → maxpool 2 → ``conv2`` (16@5x5, VALID) →
  ReLU → maxpool 2 → flatten → ``fc1`` (120) → ReLU → ``fc2`` (84) → ReLU →
  ``fc3`` (``num_classes``). All layers have a bias; 61,706 parameters for 10
  classes.

  The flatten before ``fc1`` runs over NHWC, i.e. in (h, w, c) order. PyTorch
  flattens NCHW in (c, h, w) order, so a converter must permute the rows of
  PyTorch's ``fc1.weight.T`` (400 = 16·5·5) from (c, h, w) to (h, w, c).

  Attributes:
    num_classes: number of output logits.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay ``param_dtype``.
    param_dtype: parameter dtype.
  """

  num_classes: int = 10
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits for a batch of NHWC images.

    Args:
      x: images, shape ``(N, 28, 28, 1)``.
      train: unused (no BatchNorm or dropout); accepted for a uniform interface.

    Returns:
      Logits, shape ``(N, num_classes)``, dtype ``dtype``.
    """
    del train
    conv = layers.with_dtypes(self, layers.Conv, kernel_init=_torch_default_init)
    dense = layers.with_dtypes(self, nn.Dense, kernel_init=_torch_default_init)
    x = conv(6, (5, 5), padding=((2, 2), (2, 2)), name='conv1')(x)
    x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = conv(16, (5, 5), padding='VALID', name='conv2')(x)
    x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))  # NHWC order: (h, w, c).
    x = nn.relu(dense(120, name='fc1')(x))
    x = nn.relu(dense(84, name='fc2')(x))
    return dense(self.num_classes, name='fc3')(x)
