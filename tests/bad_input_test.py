"""Bad settings are refused before any training step, without touching the workdir."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from ec2t_jax.training import checkpoint as checkpoint_lib
from ec2t_jax.training import datasets, train
from ec2t_jax.training import workdir as workdir_lib


def _wrong_init_from(tmp_path):
  path = str(tmp_path / 'wrong_init')
  checkpoint_lib.save_variables(
    path,
    {
      'params': {'conv1': {'kernel': jnp.zeros((3, 3, 1, 6)), 'bias': jnp.zeros(6)}},
      'batch_stats': {},
    },
  )
  return path


CASES = {
  'unknown model': (dict(model='resnet7'), ValueError, "unknown model 'resnet7'; valid names"),
  'unknown dataset': (dict(dataset='mnistt'), ValueError, "unknown dataset 'mnistt'"),
  'negative gamma': ({'ec2t.gamma': -1.0}, ValueError, 'gamma must be >= 0, got -1.0'),
  'zero init_scale': ({'ec2t.init_scale': 0.0}, ValueError, 'init_scale must be > 0, got 0.0'),
  'zero batch size': (dict(batch_size=0), ValueError, 'config.batch_size must be > 0, got 0'),
  'negative fp lr': ({'fp.learning_rate': -0.1}, ValueError, 'config.fp.learning_rate must be > 0'),
  'zero latent lr': (
    {'ec2t.latent_learning_rate': 0.0},
    ValueError,
    'config.ec2t.latent_learning_rate must be > 0',
  ),
  'mask selects nothing': (
    {'ec2t.ternary_pattern': 'no_such_layer'},
    ValueError,
    'ternary_mask selects no parameter',
  ),
  'init_from mismatched': ('wrong_init', ValueError, 'does not fit the model'),
  'dataset not prepared': (
    dict(dataset='cifar10', model='resnet20', data_dir='EMPTY'),
    FileNotFoundError,
    'tfds build cifar10 --file_format=array_record',
  ),
}


@pytest.mark.parametrize('name', list(CASES))
def test_bad_config_is_refused_before_training(tmp_path, name, tiny_mnist):
  overrides, error, message = CASES[name]
  if overrides == 'wrong_init':
    overrides = {'init_from': _wrong_init_from(tmp_path)}
  overrides = dict(overrides)
  if overrides.get('data_dir') == 'EMPTY':
    overrides['data_dir'] = str(tmp_path / 'no_data')
  workdir = tmp_path / 'work'
  workdir.mkdir()
  (workdir / 'keep.txt').write_text('untouched')
  with pytest.raises(error, match=message):
    train.train_and_evaluate(tiny_mnist(**overrides), str(workdir))
  assert sorted(os.listdir(workdir)) == ['keep.txt']
  assert (workdir / 'keep.txt').read_text() == 'untouched'


def test_workdir_that_cannot_be_created(tmp_path, tiny_mnist):
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  with pytest.raises(ValueError, match='cannot be created'):
    train.train_and_evaluate(tiny_mnist(), str(blocker / 'sub'))


def test_workdir_of_another_config_is_refused_unless_overwrite(tmp_path, tiny_mnist):
  workdir = str(tmp_path / 'work')
  config = tiny_mnist()
  os.makedirs(workdir)
  # A finished claim of another run: only config.json is needed for the check.
  workdir_lib.claim_workdir(tiny_mnist(**{'ec2t.gamma': 0.5}), workdir)
  before = open(os.path.join(workdir, 'config.json')).read()
  with pytest.raises(ValueError, match=r'different config \(ec2t.gamma: 0.5 -> 0.15\)'):
    train.train_and_evaluate(config, workdir)
  assert open(os.path.join(workdir, 'config.json')).read() == before


def test_processes_and_resumes_of_one_run_share_a_workdir(tmp_path, tiny_mnist):
  """Fields that differ between the processes of one run (or its restarts) are not a new run."""
  workdir = str(tmp_path / 'work')
  first = {'process_id': 0, 'coordinator_address': '127.0.0.1:1234', 'worker_count': 0}
  workdir_lib.claim_workdir(tiny_mnist(distributed=True, num_processes=2, **first), workdir)
  other = {'process_id': 1, 'coordinator_address': '127.0.0.1:5678', 'worker_count': 2}
  workdir_lib.claim_workdir(tiny_mnist(distributed=True, num_processes=2, **other), workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    written = json.load(f)
  assert not os.path.exists(os.path.join(workdir, 'config.json.tmp'))
  # Process 0 of this one-process test rewrote it; a different run is still refused.
  assert written['coordinator_address'] == '127.0.0.1:5678'
  with pytest.raises(ValueError, match='num_processes: 2 -> 1'):
    workdir_lib.claim_workdir(tiny_mnist(distributed=True, num_processes=1, **other), workdir)


def test_missing_dataset_error_names_the_command(tmp_path):
  with pytest.raises(datasets.DatasetNotPreparedError, match='tfds build cifar100'):
    datasets.get_data_source('cifar100', 'train', data_dir=str(tmp_path))


@pytest.mark.parametrize(
  'flag, message',
  [
    ('--config.ec2t.gama=0.1', 'gama'),
    ('--config.model=resnet7', "error: unknown model 'resnet7'"),
  ],
)
@pytest.mark.slow
def test_cli_exits_nonzero_with_one_line_error(tmp_path, flag, message, repo_root):
  workdir = tmp_path / 'work'
  proc = subprocess.run(
    [sys.executable, 'main.py', '--config=configs/mnist.py:smoke', f'--workdir={workdir}', flag],
    cwd=repo_root,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert proc.returncode != 0
  assert message in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not workdir.exists()


def test_checkpoints_that_cannot_be_restored_are_not_overwritten(tmp_path, tiny_mnist):
  """A workdir whose checkpoints do not fit this train state is refused, not restarted."""
  workdir = str(tmp_path / 'work')
  config = tiny_mnist()
  workdir_lib.claim_workdir(config, workdir)  # Same config: only the checkpoint is foreign.
  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=2)
  ckpt.save(2, {'w': jnp.ones(3)}, {'phase': 'ec2t'})
  ckpt.close()
  with pytest.raises(ValueError, match=r'holds checkpoints \(steps \[2\]\) but none can be'):
    train.train_and_evaluate(config, workdir)
  assert checkpoint_lib.Checkpointer(workdir, max_to_keep=2).steps() == [2]
