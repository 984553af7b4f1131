"""Tests for ec2t_jax.models.scaling: the compound-scaling candidate table."""

import jax
import jax.numpy as jnp
import pytest

from ec2t_jax import jaxprs, models
from ec2t_jax.models import scaling


def test_published_supernet_row():
  (row,) = scaling.candidates('micronet', phi=3.5, num_classes=100, grid=[(1.4, 1.2)])
  assert row.blocks_per_stage == 23
  assert row.widths == (32, 64, 120)
  assert row.params == 8_055_124
  assert row.dw2 == pytest.approx(2.016)
  assert row.depth_mult == pytest.approx(1.4**3.5)
  assert row.macs > 1e9


def test_grid_is_spec_grid_plus_baseline():
  assert scaling.GRID[0] == (1.0, 1.0)
  assert set(scaling.GRID[1:]) == {
    (1.0, 1.4),
    (1.2, 1.3),
    (1.4, 1.2),
    (1.6, 1.1),
    (1.7, 1.1),
    (1.9, 1.0),
  }
  assert all(1.9 <= d * w * w <= 2.1 for d, w in scaling.GRID[1:])


def test_count_macs_lenet5_by_hand():
  model = models.create('lenet5', num_classes=10)
  x = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  conv1 = 28 * 28 * 6 * (5 * 5 * 1)
  conv2 = 10 * 10 * 16 * (5 * 5 * 6)
  dense = 400 * 120 + 120 * 84 + 84 * 10
  assert jaxprs.count_macs(model, shapes, x.shape) == conv1 + conv2 + dense


def test_count_macs_counts_groups_and_batch():
  model = models.create('resnet20', num_classes=10)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  one = jaxprs.count_macs(model, shapes, (1, 32, 32, 3))
  assert jaxprs.count_macs(model, shapes, (2, 32, 32, 3)) == 2 * one
  # The commonly quoted ~41M MACs of ResNet-20 at 32x32.
  assert one == 40_551_040


@pytest.mark.slow
def test_cli_prints_table(capsys):
  scaling.main(['--model', 'micronet', '--phi', '1', '--num-classes', '100'])
  out = capsys.readouterr().out
  assert 'phi=1, 100 classes' in out
  lines = out.splitlines()
  assert len(lines) == 2 + 1 + len(scaling.GRID)  # title, header, rule, rows.
  baseline = lines[3].split()
  assert baseline[:6] == ['1.00', '1.00', '1.00', '1.000', '1.000', '7']
  assert baseline[6] == '16/32/64'


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(model='resnet20'), r"model must be one of \['micronet'\], got 'resnet20'"),
    (dict(phi=-1.0), 'phi must be >= 0, got -1.0'),
    (dict(grid=[(0.0, 1.0)]), r'grid coefficients must be > 0, got \(d, w\) = \(0.0, 1.0\)'),
  ],
)
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    scaling.candidates(**kwargs)
