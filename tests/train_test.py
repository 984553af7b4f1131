"""End-to-end tests of the real `train_and_evaluate` on tiny configs."""

import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import ec2t_jax
from configs import cifar10, imagenet
from ec2t_jax import tree_util
from ec2t_jax.training import metric_writers, train
from ec2t_jax.training import workdir as workdir_lib

MOCK = tfds.testing.MockPolicy.USE_CODE


def _exactly_ternary(workdir_summary, config, workdir):
  del workdir_summary
  del config
  run = workdir_lib.load_workdir(workdir)
  params = run.variables['params']
  expected = ec2t_jax.compressed_kernels(run.opt_state, params)
  flat = tree_util.flat_dict(params)
  for name, q in expected.items():
    np.testing.assert_array_equal(np.asarray(flat[name]), np.asarray(q), err_msg=name)
  return run


def test_mnist_end_to_end_and_resume_is_a_noop(tmp_path, tiny_mnist):
  config = tiny_mnist()
  workdir = str(tmp_path / 'run')
  summary = train.train_and_evaluate(config, workdir)
  for key in (
    'fp_test_accuracy',
    'test_accuracy',
    'val_accuracy',
    'sparsity',
    'total_sparsity',
    'num_params',
    'wall_time_s',
    'steps',
    'params_sha256',
    'per_layer_sparsity',
  ):
    assert key in summary, key
  assert summary['steps'] == 9
  assert summary['num_params'] == 61_706
  assert set(summary['per_layer_sparsity']) == {
    'conv1/kernel',
    'conv2/kernel',
    'fc1/kernel',
    'fc2/kernel',
  }
  assert 0.0 < summary['sparsity'] < 1.0
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert json.load(f)['params_sha256'] == summary['params_sha256']
  assert os.path.isdir(os.path.join(workdir, 'fp_variables'))
  assert os.path.isdir(os.path.join(workdir, 'best'))
  rows = metric_writers.read_metrics(workdir)
  assert any('ec2t/total_sparsity' in r for r in rows)
  assert any('val/accuracy' in r for r in rows)
  _exactly_ternary(summary, config, workdir)
  # Running the same command again finds the finished run and reproduces its summary.
  again = train.train_and_evaluate(config, workdir)
  assert again['params_sha256'] == summary['params_sha256']
  assert again['test_accuracy'] == summary['test_accuracy']


@pytest.mark.slow
@pytest.mark.parametrize('stop_at', [2, 4, 7])  # inside FP, right after the boundary, frozen
def test_sigterm_saves_and_resume_matches_uninterrupted(tmp_path, stop_at, tiny_mnist, sigterm_at):
  config = tiny_mnist(checkpoint_every_steps=100)
  reference = train.train_and_evaluate(config, str(tmp_path / 'a'))
  sigterm_at(stop_at)
  first = train.train_and_evaluate(config, str(tmp_path / 'b'))
  assert first == {'preempted': True, 'step': stop_at}
  resumed = train.train_and_evaluate(config, str(tmp_path / 'b'))
  assert resumed['params_sha256'] == reference['params_sha256']
  assert resumed['test_accuracy'] == reference['test_accuracy']


@pytest.mark.slow
@pytest.mark.parametrize(
  'recipe, num_ternary_layers',
  [
    (cifar10, 18),  # resnet20: every conv but the stem.
    (imagenet, 16),  # resnet18: every conv but the stem and the three 1x1 downsamples.
  ],
  ids=['cifar10', 'imagenet'],
)
def test_smoke_variant_on_mock_data(tmp_path, recipe, num_ternary_layers):
  with tfds.testing.mock_data(num_examples=64, policy=MOCK):
    summary = train.train_and_evaluate(recipe.get_config('smoke'), str(tmp_path))
  assert summary['steps'] == 6
  assert len(summary['per_layer_sparsity']) == num_ternary_layers
  assert np.isfinite(summary['test_accuracy'])
  if recipe is cifar10:
    assert summary['num_params'] == 269_722


@pytest.mark.slow
def test_eight_devices_match_one(tmp_path, tiny_mnist):
  if jax.device_count() < 8:
    pytest.skip('needs 8 (simulated) devices')
  base = dict(batch_size=32, **{'ec2t.gamma': 0.15})
  one = train.train_and_evaluate(tiny_mnist(num_devices=1, **base), str(tmp_path / 'one'))
  eight = train.train_and_evaluate(tiny_mnist(num_devices=8, **base), str(tmp_path / 'eight'))
  assert eight['steps'] == one['steps']
  # Sums over a sharded batch may round differently; the runs must agree closely.
  assert abs(eight['test_accuracy'] - one['test_accuracy']) <= 0.01
  assert abs(eight['sparsity'] - one['sparsity']) <= 0.01
  for layer, value in one['per_layer_sparsity'].items():
    assert abs(eight['per_layer_sparsity'][layer] - value) <= 0.01, layer
