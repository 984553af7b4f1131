"""Your own model in the training program: `--config.model=package.module:factory`."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ec2t_jax.training import train

_MODULE = """
from flax import linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  num_classes: int
  width: int = 64
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.reshape((x.shape[0], -1)).astype(self.dtype)
    x = nn.relu(nn.Dense(self.width, dtype=self.dtype, name='body')(x))
    x = nn.relu(nn.Dense(self.width, dtype=self.dtype, name='mlp')(x))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')(x)


def make_mlp(num_classes, width=64):
  return MLP(num_classes=num_classes, width=width)
"""


@pytest.fixture
def user_models(tmp_path, monkeypatch):
  (tmp_path / 'user_models.py').write_text(textwrap.dedent(_MODULE))
  monkeypatch.syspath_prepend(str(tmp_path))
  return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize('name', ['user_models:MLP', 'user_models:make_mlp'])
def test_user_model_trains_with_its_kwargs(tmp_path, user_models, tiny_mnist, name):
  config = tiny_mnist(model=name)
  config.model_kwargs.width = 32
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  # configs/mnist.py ternarizes the first layer too and keeps the last one (found in call
  # order, not the params' alphabetical order) in full precision.
  assert list(summary['per_layer_sparsity']) == ['body/kernel', 'mlp/kernel']
  assert summary['num_params'] == 784 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10


@pytest.mark.parametrize(
  'name, message',
  [
    ('no_such_module:MLP', "cannot import 'no_such_module'"),
    ('user_models:Missing', "has no callable 'Missing'"),
    ('resnet7', "unknown model 'resnet7'.*package.module:factory"),
  ],
)
def test_bad_model_names_are_refused_before_any_step(
  tmp_path, user_models, tiny_mnist, name, message
):
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(tiny_mnist(model=name), str(workdir))
  assert not workdir.exists()


@pytest.mark.slow
def test_user_model_from_the_command_line(tmp_path, user_models, tiny_flags, repo_root):
  env = {**os.environ, 'PYTHONPATH': f'{user_models}{os.pathsep}{repo_root}'}
  workdir = tmp_path / 'cli'
  proc = subprocess.run(
    [
      sys.executable,
      'main.py',
      f'--workdir={workdir}',
      *tiny_flags,
      '--config.model=user_models:MLP',
    ],
    cwd=repo_root,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(workdir / 'summary.json') as f:
    assert json.load(f)['model'] == 'user_models:MLP'
