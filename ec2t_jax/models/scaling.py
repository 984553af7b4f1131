"""Compound-scaling helpers shared by MicroNet and EfficientNet.

Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML 2019 (arXiv 1905.11946). EC2T (Marban et al., CVPR-W 2020,
arXiv 2004.01077) scales its CIFAR MicroNet with the same rules (docs/algorithm.md §8).
"""

import math

__all__ = ['round_filters', 'round_repeats']


def round_filters(
  filters: int,
  width_mult: float,
  divisor: int = 8,
  min_depth: int | None = None,
) -> int:
  """Scales a channel count by ``width_mult`` and rounds it to a multiple of ``divisor``.

  The rule of the EfficientNet reference implementation::

      f' = max(min_depth, int(f·w + divisor/2) // divisor · divisor)
      f' += divisor   if f' < 0.9·f·w      (never round down by more than 10 %)

  Args:
    filters: the unscaled channel count.
    width_mult: the width multiplier (``w**phi`` in compound scaling).
    divisor: the channel count is rounded to a multiple of this.
    min_depth: lower bound of the result; defaults to ``divisor``.

  Returns:
    The scaled channel count.

  Raises:
    ValueError: if ``width_mult`` or ``divisor`` is not positive.

  Example:
    >>> round_filters(64, 1.2**3.5)
    120
  """
  if width_mult <= 0:
    raise ValueError(f'width_mult must be > 0, got {width_mult}')
  if divisor <= 0:
    raise ValueError(f'divisor must be > 0, got {divisor}')
  min_depth = divisor if min_depth is None else min_depth
  scaled = filters * width_mult
  new_filters = max(min_depth, int(scaled + divisor / 2) // divisor * divisor)
  if new_filters < 0.9 * scaled:
    new_filters += divisor
  return int(new_filters)


def round_repeats(repeats: int, depth_mult: float) -> int:
  """Scales a block count by ``depth_mult``, rounding up: ``ceil(depth_mult · repeats)``.

  Args:
    repeats: the unscaled number of blocks.
    depth_mult: the depth multiplier (``d**phi`` in compound scaling).

  Returns:
    The scaled number of blocks.

  Raises:
    ValueError: if ``depth_mult`` is not positive.

  Example:
    >>> round_repeats(7, 1.4**3.5)
    23
  """
  if depth_mult <= 0:
    raise ValueError(f'depth_mult must be > 0, got {depth_mult}')
  return int(math.ceil(depth_mult * repeats))
