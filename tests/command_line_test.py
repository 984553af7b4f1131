"""The training command's first messages: what a newcomer sees before any step."""

import os
import subprocess
import sys

import pytest

from ec2t_jax.training import datasets, train


def _main(args, cwd, **env):
  return subprocess.run(
    [sys.executable, 'main.py', *args],
    cwd=cwd,
    capture_output=True,
    text=True,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu', **env},
    timeout=300,
  )


@pytest.mark.slow
def test_missing_flags_are_named_with_an_example(repo_root):
  for args, named in (([], '--config and --workdir'), (['--config=mnist:smoke'], '--workdir')):
    proc = _main(args, repo_root)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f'error: {named} must be given, e.g.')
    assert 'None' not in proc.stderr


def test_imagenet_without_data_or_weights_says_both_at_once(tmp_path):
  from ec2t_jax.configs import imagenet

  config = imagenet.get_config()
  config.data_dir = str(tmp_path / 'tfds')
  with pytest.raises(datasets.DatasetNotPreparedError) as e:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  message = ' '.join(str(e.value).split())
  assert "dataset 'imagenet2012'" in message and 'config.init_from is empty' in message
  # Sentences, not lines run together, and the package the README names.
  assert 'manual. Prepare it once with `tfds build imagenet2012' in message
  assert 'pip install tensorflow-cpu tensorflow-datasets' in message
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_imagenet_error_is_the_only_thing_the_command_says(tmp_path, repo_root):
  proc = _main(
    [
      '--config=configs/imagenet.py',
      f'--workdir={tmp_path / "run"}',
      f'--config.data_dir={tmp_path / "tfds"}',
    ],
    repo_root,
  )
  assert proc.returncode == 1
  not_info = [line for line in proc.stderr.splitlines() if line and not line.startswith('I')]
  assert len(not_info) == 1 and not_info[0].startswith('error: dataset'), proc.stderr[-3000:]
  assert not (tmp_path / 'run').exists()
