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
from ec2t_jax.training import metric_writers, runtime, train
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
    assert runtime.enable_compilation_cache(str(tmp_path / 'other')) == before[0]  # Kept.
    jax.config.update('jax_compilation_cache_dir', None)
    assert runtime.enable_compilation_cache('') is None
    assert jax.config.jax_compilation_cache_dir is None
    home = os.path.expanduser('~')
    assert runtime.enable_compilation_cache('~/ec2t_cache') == os.path.join(home, 'ec2t_cache')
    assert jax.config.jax_compilation_cache_dir == os.path.join(home, 'ec2t_cache')
    assert jax.config.jax_compilation_cache_max_size == runtime.COMPILATION_CACHE_BYTES
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


def _main_command(workdir, flags):
  return [sys.executable, 'main.py', f'--workdir={workdir}', *flags]


def test_second_process_on_a_held_workdir_is_refused_at_once(tmp_path, tiny_flags, repo_root):
  """Two real processes on one workdir: the second names the first and leaves at once."""
  workdir = str(tmp_path / 'run')
  lock_path = os.path.join(workdir, workdir_lib.LOCK_FILE)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  flags = [*tiny_flags, '--config.fp.num_epochs=1000']  # Long enough to be running throughout.
  first = subprocess.Popen(
    _main_command(workdir, flags),
    cwd=repo_root,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    env=env,
  )
  try:
    deadline = time.time() + 300
    while not os.path.exists(lock_path) and first.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    assert first.poll() is None, 'the first run ended before it held the workdir'
    start = time.time()
    second = subprocess.run(
      _main_command(workdir, flags), cwd=repo_root, capture_output=True, text=True, env=env
    )
    assert second.returncode != 0
    assert f'is in use by pid {first.pid} on host' in second.stderr, second.stderr[-2000:]
    assert 'Traceback' not in second.stderr
    assert first.poll() is None, 'the refused run disturbed the first one'
    assert time.time() - start < 120
    first.send_signal(signal.SIGTERM)  # The first stops cleanly and releases the lock.
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert 'after SIGTERM' in err
    assert not os.path.exists(lock_path)
  finally:
    if first.poll() is None:
      first.kill()
      first.communicate()


# Runs main.py, stalling inside orbax's write of checkpoint STEP (after its temporary
# directory exists, before it is renamed into place) and announcing it with MARKER.
_STALL_IN_SAVE = """
import runpy, sys, time
import orbax.checkpoint as ocp
marker, step = sys.argv[1], sys.argv[2]
original = ocp.JsonCheckpointHandler.async_save
def stall(self, directory, *args, **kwargs):
  out = original(self, directory, *args, **kwargs)
  if f'/checkpoints/{step}' in str(directory):
    open(marker, 'w').close()
    time.sleep(600)
  return out
ocp.JsonCheckpointHandler.async_save = stall
sys.argv = ['main.py', *sys.argv[3:]]
runpy.run_path('main.py', run_name='__main__')
"""


def test_sigkill_while_a_checkpoint_is_written_then_resume_is_bitwise_identical(
  tmp_path, uninterrupted, tiny_flags, tiny_mnist, repo_root
):
  workdir = str(tmp_path / 'run')
  marker = str(tmp_path / 'in_save')
  proc = subprocess.Popen(
    [sys.executable, '-c', _STALL_IN_SAVE, marker, '4', f'--workdir={workdir}', *tiny_flags],
    cwd=repo_root,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  deadline = time.time() + 300
  while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  _, err = proc.communicate(timeout=60)
  assert os.path.exists(marker), f'the run never reached the save: {err[-2000:]}'
  checkpoints = os.path.join(workdir, 'checkpoints')
  assert any('tmp' in name for name in os.listdir(checkpoints)), os.listdir(checkpoints)
  resumed = train.train_and_evaluate(tiny_mnist(), workdir)
  assert resumed['params_sha256'] == uninterrupted['params_sha256']
  assert not [name for name in os.listdir(checkpoints) if 'tmp' in name]


def test_a_field_added_to_the_defaults_later_does_not_block_a_resume(tmp_path, tiny_mnist):
  from ec2t_jax.training import parse as parse_lib

  workdir = str(tmp_path / 'run')
  workdir_lib.claim_workdir(parse_lib.parse(tiny_mnist()), workdir).release()
  path = os.path.join(workdir, 'config.json')
  recorded = json.load(open(path))
  del recorded['distill.stages']  # As a run written before the field existed.
  json.dump(recorded, open(path, 'w'))
  workdir_lib.claim_workdir(parse_lib.parse(tiny_mnist()), workdir).release()  # Resumes.
  # (The resume recorded the whole config again.) Set to another value, it is a different config.
  with pytest.raises(ValueError, match=r"different config \(distill.stages: '' -> 'ec2t'\)"):
    workdir_lib.claim_workdir(parse_lib.parse(tiny_mnist(**{'distill.stages': 'ec2t'})), workdir)
