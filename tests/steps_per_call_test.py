"""Several training steps per compiled call (`config.steps_per_call`): equal results, resume."""

import json

import numpy as np
import pytest

from ec2t_jax import tree_util
from ec2t_jax.training import parse as parse_lib
from ec2t_jax.training import train
from ec2t_jax.training import workdir as workdir_lib

# 6 steps per epoch: with k=4 each epoch is one call of 4 steps and two single steps.
EPOCH = {'steps_per_epoch': 6, 'log_every_steps': 5, 'checkpoint_every_steps': 5}


def _run(config, workdir):
  return train.train_and_evaluate(config, str(workdir))


def _params(workdir):
  return tree_util.flat_dict(workdir_lib.load_workdir(str(workdir)).variables['params'])


@pytest.mark.slow  # Trains tiny runs end to end.
def test_k_steps_per_call_give_the_results_of_one(tmp_path, tiny_mnist, sigterm_at):
  one = _run(tiny_mnist(**EPOCH), tmp_path / 'k1')
  calls = sigterm_at(0)  # Counts the training inputs (one per call).
  four = _run(tiny_mnist(steps_per_call=4, **EPOCH), tmp_path / 'k4')
  assert calls['n'] == 3 * 3  # 3 epochs, each one call of 4 steps and 2 single steps.
  assert four['steps'] == one['steps'] == 18
  # One compiled step and a scan of four are different XLA programs, so float32 results may
  # differ by rounding (measured: at most 4e-7 of a leaf's largest value after 18 steps):
  # the ternary kernels and the accuracy are identical, the other leaves agree to 1e-5.
  assert four['test_accuracy'] == one['test_accuracy']
  p1, p4 = _params(tmp_path / 'k1'), _params(tmp_path / 'k4')
  for name, a in p1.items():
    a, b = np.asarray(a), np.asarray(p4[name])
    if name in ('conv1/kernel', 'conv2/kernel', 'fc1/kernel', 'fc2/kernel'):
      np.testing.assert_array_equal(a, b, err_msg=name)
    else:
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.max(np.abs(a))), err_msg=name)
  # The logged training metrics are per step, as with k=1.
  rows = [json.loads(line) for line in open(tmp_path / 'k4' / 'metrics.jsonl')]
  assert any('train/loss' in r for r in rows)


@pytest.mark.slow  # Trains tiny runs end to end.
def test_a_run_stopped_between_calls_resumes_exactly(tmp_path, tiny_mnist, sigterm_at, monkeypatch):
  config = tiny_mnist(steps_per_call=4, **EPOCH)
  whole = _run(config, tmp_path / 'whole')
  # SIGTERM while the 4th call's input is sharded: the run stops after that call (step 10).
  sigterm_at(4)
  stopped = _run(tiny_mnist(steps_per_call=4, **EPOCH), tmp_path / 'run')
  assert stopped == {'preempted': True, 'step': 10}
  monkeypatch.undo()
  resumed = _run(config, tmp_path / 'run')
  assert resumed['params_sha256'] == whole['params_sha256']


@pytest.mark.parametrize('value', [0, -2])
def test_bad_steps_per_call_is_refused(tiny_mnist, value):
  with pytest.raises(ValueError, match=f'config.steps_per_call must be an integer >= 1.*{value!r}'):
    parse_lib.parse(tiny_mnist(steps_per_call=value), check_data=False)
