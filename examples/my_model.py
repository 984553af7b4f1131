"""A model of your own for `main.py`: `--config.model=my_model:mlp` (with examples/ on PYTHONPATH).

`main.py` calls the factory with `num_classes`, the entries of
`config.model_kwargs` and, since it accepts one, `dtype`; the module is applied
as `model.apply(variables, images, train=...)` to NHWC images.
"""

import jax.numpy as jnp
from flax import linen as nn


class MLP(nn.Module):
  """Flattened image → `depth` hidden ReLU layers of `width` → logits."""

  num_classes: int
  width: int = 256
  depth: int = 2
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # No dropout or BatchNorm here.
    x = x.reshape((x.shape[0], -1)).astype(self.dtype)
    for i in range(self.depth):
      x = nn.relu(nn.Dense(self.width, dtype=self.dtype, name=f'hidden{i}')(x))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')(x)


def mlp(num_classes: int, width: int = 256, depth: int = 2, dtype=jnp.float32) -> MLP:
  """The factory `main.py` calls (`--config.model=my_model:mlp`)."""
  return MLP(num_classes=num_classes, width=width, depth=depth, dtype=dtype)
