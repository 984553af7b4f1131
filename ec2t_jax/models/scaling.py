"""Compound scaling (EfficientNet's rules) and the MicroNet candidate table.

Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML 2019 (arXiv 1905.11946). EC2T (Marban et al., CVPR-W 2020,
arXiv 2004.01077, §3.4) scales its CIFAR MicroNet with the same rules
(docs/algorithm.md §8): at φ = 1 a grid search over depth and width
coefficients ``(d, w)`` under ``d·w² ≈ 2`` (the resolution is fixed for CIFAR),
then ``depth_mult = d**φ`` and ``width_mult = w**φ``, with channel and block
counts rounded by `ec2t_jax.models.layers.round_filters` and
`ec2t_jax.models.layers.round_repeats`. `candidates` tabulates the grid for a
given φ (blocks per stage, stage widths, parameters and multiply-accumulates of
each candidate).

The package ``ec2t_jax.models`` does not import this module (``models.scaling``
loads it on first access), so that ``python -m ec2t_jax.models.scaling`` runs it
fresh as ``__main__``.

Command line::

    python -m ec2t_jax.models.scaling --model micronet --phi 3.5 --num-classes 100
"""

import argparse
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ec2t_jax import jaxprs, models

__all__ = [
  'GRID',
  'Candidate',
  'candidates',
  'format_table',
  'main',
]

# (d, w) at φ = 1: the baseline, then the docs/algorithm.md §8 grid under d·w² ≈ 2.
GRID = (
  (1.0, 1.0),
  (1.0, 1.4),
  (1.2, 1.3),
  (1.4, 1.2),
  (1.6, 1.1),
  (1.7, 1.1),
  (1.9, 1.0),
)

_MODELS = ('micronet',)


class Candidate(NamedTuple):
  """One scaled network.

  Attributes:
    d: depth coefficient at φ = 1.
    w: width coefficient at φ = 1.
    dw2: the FLOPs-growth proxy ``d·w²`` (≈ 2 on the grid).
    depth_mult: ``d**phi``.
    width_mult: ``w**phi``.
    blocks_per_stage: ``ceil(7·depth_mult)``.
    widths: channels of the three stages.
    params: trainable parameters (``'params'`` collection, BatchNorm statistics excluded).
    macs: multiply-accumulates of the convolutions and the dense layer for one 32x32 image.
  """

  d: float
  w: float
  dw2: float
  depth_mult: float
  width_mult: float
  blocks_per_stage: int
  widths: tuple[int, ...]
  params: int
  macs: int


def candidates(
  model: str = 'micronet',
  phi: float = 1.0,
  num_classes: int = 10,
  grid: Sequence[tuple[float, float]] = GRID,
) -> list[Candidate]:
  """Scales the model with every ``(d, w)`` of the grid at compound coefficient ``phi``.

  Args:
    model: the base network; only ``'micronet'``.
    phi: compound coefficient, ``>= 0``.
    num_classes: classifier outputs (10 for CIFAR-10, 100 for CIFAR-100).
    grid: ``(d, w)`` pairs at φ = 1.

  Returns:
    One :class:`Candidate` per grid point, in grid order.

  Raises:
    ValueError: for an unknown model, a negative ``phi``, or a non-positive
      coefficient.

  Example:
    >>> row = candidates('micronet', phi=3.5, num_classes=100, grid=[(1.4, 1.2)])[0]
    >>> row.blocks_per_stage, row.widths, row.params
    (23, (32, 64, 120), 8055124)
  """
  if model not in _MODELS:
    raise ValueError(f'model must be one of {list(_MODELS)}, got {model!r}')
  if phi < 0:
    raise ValueError(f'phi must be >= 0, got {phi}')
  x = jax.ShapeDtypeStruct((1, *models.input_shape(model)), jnp.float32)
  rows = []
  for d, w in grid:
    if d <= 0 or w <= 0:
      raise ValueError(f'grid coefficients must be > 0, got (d, w) = ({d}, {w})')
    net = models.create(model, num_classes=num_classes, depth_mult=d**phi, width_mult=w**phi)
    shapes = jax.eval_shape(
      lambda x, net=net: net.init({'params': jax.random.key(0)}, x, train=False), x
    )
    params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes['params']))
    rows.append(
      Candidate(
        d=d,
        w=w,
        dw2=d * w * w,
        depth_mult=d**phi,
        width_mult=w**phi,
        blocks_per_stage=net.blocks_per_stage,
        widths=tuple(net.widths),
        params=params,
        macs=jaxprs.count_macs(net, shapes, x.shape),
      )
    )
  return rows


def format_table(rows: Sequence[Candidate]) -> str:
  """Renders candidates as a fixed-width text table."""
  header = (
    f'{"d":>5} {"w":>5} {"d·w²":>5} {"depth_mult":>10} {"width_mult":>10} '
    f'{"blocks":>6} {"widths":>12} {"params":>11} {"MACs":>15}'
  )
  lines = [header, '-' * len(header)]
  for r in rows:
    widths = '/'.join(str(c) for c in r.widths)
    lines.append(
      f'{r.d:5.2f} {r.w:5.2f} {r.dw2:5.2f} {r.depth_mult:10.3f} {r.width_mult:10.3f} '
      f'{r.blocks_per_stage:6d} {widths:>12} {r.params:11,d} {r.macs:15,d}'
    )
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  """Prints the candidate table (``python -m ec2t_jax.models.scaling --help``)."""
  parser = argparse.ArgumentParser(
    prog='python -m ec2t_jax.models.scaling', description=__doc__.split('\n\n')[0]
  )
  parser.add_argument('--model', default='micronet', choices=_MODELS)
  parser.add_argument('--phi', type=float, default=1.0, help='compound coefficient φ')
  parser.add_argument('--num-classes', type=int, default=10)
  args = parser.parse_args(argv)
  rows = candidates(args.model, phi=args.phi, num_classes=args.num_classes)
  print(
    f'{args.model}, phi={args.phi:g}, {args.num_classes} classes '
    f'(MACs: conv + dense, one {"x".join(map(str, models.input_shape(args.model)[:2]))} image)'
  )
  print(format_table(rows))


if __name__ == '__main__':
  main()
