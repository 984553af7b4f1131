"""Runs that survive SIGKILL, corrupted checkpoints and numerical accidents."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ec2t_jax.training import checkpoint as checkpoint_lib
from ec2t_jax.training import metric_writers, train
from ec2t_jax.training import workdir as workdir_lib

pytestmark = pytest.mark.slow  # Subprocesses or long runs: left out of `make test-fast`.


def _logged_steps(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  steps = [0]
  with open(path) as f:
    for line in f:
      try:
        steps.append(int(json.loads(line)['step']))
      except (json.JSONDecodeError, KeyError):
        pass
  return max(steps)


def _cli(workdir, flags, cwd, *, kill_after_step=None, timeout=600):
  """Runs main.py; with kill_after_step, SIGKILLs it once that step is logged."""
  proc = subprocess.Popen(
    [sys.executable, 'main.py', f'--workdir={workdir}', *flags],
    cwd=cwd,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  deadline = time.time() + timeout
  if kill_after_step is not None:
    while proc.poll() is None and time.time() < deadline:
      if _logged_steps(workdir) >= kill_after_step:
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.05)
  _, err = proc.communicate(timeout=max(deadline - time.time(), 1))
  return proc.returncode, err


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, tiny_mnist):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  return train.train_and_evaluate(tiny_mnist(), workdir)


def test_sigkill_at_random_steps_then_resume_is_bitwise_identical(
  tmp_path, uninterrupted, tiny_flags, repo_root
):
  rng = np.random.default_rng(int(time.time()))
  # One kill inside the FP phase (steps 1-3), one in EC2T/frozen (4-9), chosen at random.
  kill_points = [int(rng.integers(1, 3)), int(rng.integers(4, 8))]
  for kill_after in kill_points:
    workdir = str(tmp_path / f'kill_{kill_after}')
    code, err = _cli(workdir, tiny_flags, repo_root, kill_after_step=kill_after)
    assert code == -signal.SIGKILL, f'run ended before the kill (rc={code}): {err[-2000:]}'
    assert not os.path.exists(os.path.join(workdir, 'summary.json'))
    code, err = _cli(workdir, tiny_flags, repo_root)
    assert code == 0, err[-2000:]
    with open(os.path.join(workdir, 'summary.json')) as f:
      resumed = json.load(f)
    assert resumed['params_sha256'] == uninterrupted['params_sha256'], f'kill at {kill_after}'
    assert resumed['test_accuracy'] == uninterrupted['test_accuracy']
  # The restarts loaded their executables from the persistent compilation cache.
  cache = os.environ['JAX_COMPILATION_CACHE_DIR']
  assert f'persistent compilation cache: {cache}' in err
  assert any(name.endswith('-cache') for name in os.listdir(cache))


def test_compilation_cache_is_enabled_unless_chosen_already(tmp_path):
  before = jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size
  try:
    assert train.enable_compilation_cache(str(tmp_path / 'other')) == before[0]  # Kept.
    jax.config.update('jax_compilation_cache_dir', None)
    assert train.enable_compilation_cache('') is None
    assert jax.config.jax_compilation_cache_dir is None
    home = os.path.expanduser('~')
    assert train.enable_compilation_cache('~/ec2t_cache') == os.path.join(home, 'ec2t_cache')
    assert jax.config.jax_compilation_cache_dir == os.path.join(home, 'ec2t_cache')
    assert jax.config.jax_compilation_cache_max_size == train.COMPILATION_CACHE_BYTES
  finally:
    jax.config.update('jax_compilation_cache_dir', before[0])
    jax.config.update('jax_compilation_cache_max_size', before[1])


def test_corrupted_latest_checkpoint_falls_back_to_an_intact_one(
  tmp_path, uninterrupted, caplog, tiny_mnist, sigterm_at
):
  config = tiny_mnist(**{'checkpoint_every_steps': 2})
  workdir = str(tmp_path / 'run')
  sigterm_at(6)  # Stop at step 6 as if preempted.
  assert train.train_and_evaluate(config, workdir)['preempted']
  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.max_to_keep)
  steps = ckpt.steps()
  ckpt.close()
  assert steps[-1] == 6 and len(steps) >= 2
  latest = os.path.join(workdir, 'checkpoints', '6', 'state')
  victims = [os.path.join(d, f) for d, _, fs in os.walk(latest) for f in fs]
  for victim in victims:  # Cut every file of the latest state in half.
    with open(victim, 'r+b') as f:
      f.truncate(os.path.getsize(victim) // 2)
  with caplog.at_level('WARNING'):
    resumed = train.train_and_evaluate(config, workdir)
  assert 'checkpoint 6' in caplog.text and 'trying an older one' in caplog.text
  assert resumed['params_sha256'] == uninterrupted['params_sha256']


def test_nonfinite_loss_stops_with_the_step_and_keeps_good_checkpoints(
  tmp_path, monkeypatch, tiny_mnist
):
  config = tiny_mnist()
  workdir = str(tmp_path / 'nan')
  original = train.to_global
  calls = {'n': 0}

  def poisoned(batch, sharding):
    if 'mask' not in batch:
      calls['n'] += 1
      if calls['n'] == 5:  # The 5th training batch holds a NaN.
        batch = dict(batch, image=np.full_like(batch['image'], np.nan))
    return original(batch, sharding)

  monkeypatch.setattr(train, 'to_global', poisoned)
  with pytest.raises(train.NonFiniteError, match='at step 5'):
    train.train_and_evaluate(config, workdir)
  run = workdir_lib.load_workdir(workdir)
  assert run.step <= 4
  leaves = [np.asarray(x) for x in jax.tree.leaves((run.variables, run.opt_state))]
  assert all(np.all(np.isfinite(x)) for x in leaves if np.issubdtype(x.dtype, np.floating))

  calls['n'] = 0
  skipping = tiny_mnist(skip_nonfinite=True)
  summary = train.train_and_evaluate(skipping, str(tmp_path / 'skip'))
  assert summary['steps'] == 9 and np.isfinite(summary['test_accuracy'])
  rows = metric_writers.read_metrics(str(tmp_path / 'skip'))
  assert sum(r.get('train/skipped_nonfinite', 0) for r in rows) == 1
