"""Starting a run from a PyTorch `.pt`/`.pth` state_dict through the training program.

The file is written by `ec2t_jax.models.pytorch.to_pytorch`, so the network it holds is
known: the run's first evaluation (the network it starts compressing, recorded as
`fp_test_accuracy` when the full-precision stage has no epochs) must equal that network's
accuracy, and the run must then train.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ec2t_jax.models import pytorch as pytorch_lib
from ec2t_jax.training import checkpoint as checkpoint_lib
from ec2t_jax.training import train
from ec2t_jax.training import workdir as workdir_lib

torch = pytest.importorskip('torch')


def _save_pt(variables, model_name: str, path: str) -> str:
  state_dict = pytorch_lib.to_pytorch(jax_to_numpy(variables), model_name)
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}, path)
  return path


def jax_to_numpy(variables):
  """`{'params', 'batch_stats'}` as nested dicts of numpy arrays."""
  import jax

  return jax.tree.map(np.asarray, {k: variables[k] for k in ('params', 'batch_stats')})


@pytest.mark.slow
def test_main_starts_lenet5_from_a_pt_file(tmp_path, trained_workdir, repo_root, tiny_flags):
  """`main.py --config=configs/mnist.py:smoke --config.init_from=lenet5.pt`, num_classes left 0."""
  source = workdir_lib.load_workdir(trained_workdir)
  source_summary = json.load(open(os.path.join(trained_workdir, 'summary.json')))
  pt = _save_pt(source.variables, 'lenet5', str(tmp_path / 'lenet5.pt'))
  workdir = tmp_path / 'run'
  result = subprocess.run(
    [sys.executable, 'main.py', *tiny_flags, f'--workdir={workdir}']
    + [f'--config.init_from={pt}', '--config.fp.num_epochs=0', '--config.compilation_cache_dir='],
    cwd=repo_root,
    capture_output=True,
    text=True,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.load(open(workdir / 'summary.json'))
  # The network the run started from is the source network: the same test accuracy on the
  # same evaluation examples (the source's own summary measured it on its final params).
  assert summary['fp_test_accuracy'] == source_summary['test_accuracy']
  assert summary['steps'] > 0 and summary['params_sha256'] != source_summary['params_sha256']


@pytest.mark.slow
def test_resnet20_from_a_pth_file_equals_the_same_network_from_orbax(tmp_path):
  """The CIFAR-10 recipe's default num_classes (0: the dataset's) with a `.pth` ResNet-20."""
  import jax
  import tensorflow_datasets as tfds

  from ec2t_jax import models
  from ec2t_jax.configs import cifar10
  from ec2t_jax.training import setup as setup_lib

  model = models.create('resnet20', num_classes=10)
  variables = setup_lib.initial_variables(model, (32, 32, 3), seed=7)
  # Non-trivial BatchNorm statistics, so that a dropped or transposed one would show.
  rng = np.random.default_rng(0)
  variables['batch_stats'] = jax.tree.map(
    lambda x: np.asarray(x) + rng.uniform(0.1, 0.5, np.shape(x)).astype(np.float32),
    variables['batch_stats'],
  )
  pth = _save_pt(variables, 'resnet20', str(tmp_path / 'resnet20.pth'))
  checkpoint_lib.save_variables(str(tmp_path / 'orbax'), jax_to_numpy(variables))

  def run(init_from: str, name: str):
    config = cifar10.get_config('smoke')
    config.model = 'resnet20'
    assert config.num_classes == 0  # The recipe's default: the dataset's classes.
    config.init_from = init_from
    config.fp.num_epochs = 0
    config.compilation_cache_dir = ''
    with tfds.testing.mock_data(num_examples=64):
      return train.train_and_evaluate(config, str(tmp_path / name))

  from_pth, from_orbax = run(pth, 'pth'), run(str(tmp_path / 'orbax'), 'orbax')
  assert from_pth['fp_test_accuracy'] == from_orbax['fp_test_accuracy']
  assert from_pth['params_sha256'] == from_orbax['params_sha256']
  assert from_pth['steps'] > 0


@pytest.mark.slow
def test_pt_without_torch_is_one_line(tmp_path, repo_root, tiny_flags):
  """Without PyTorch installed, a `.pt` init_from is one `error:` line naming the extra."""
  (tmp_path / 'lenet5.pt').write_bytes(b'not read')
  blocker = tmp_path / 'site'
  blocker.mkdir()
  (blocker / 'sitecustomize.py').write_text("import sys\nsys.modules['torch'] = None\n")
  result = subprocess.run(
    [sys.executable, 'main.py', *tiny_flags, f'--workdir={tmp_path / "run"}']
    + [f'--config.init_from={tmp_path / "lenet5.pt"}', '--config.compilation_cache_dir='],
    cwd=repo_root,
    capture_output=True,
    text=True,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(blocker)},
    timeout=300,
  )
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and "pip install 'ec2t_jax[torch]'" in last, last
  assert not (tmp_path / 'run').exists()
