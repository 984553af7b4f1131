"""Two processes joined with jax.distributed on 127.0.0.1 train like one with two devices."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # Subprocesses or long runs: left out of `make test-fast`.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return env


def _summary(workdir):
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def _run_two_processes(workdir, flags, cwd):
  address = f'127.0.0.1:{_free_port()}'
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        'main.py',
        f'--workdir={workdir}',
        *flags,
        '--config.distributed=True',
        f'--config.coordinator_address={address}',
        '--config.num_processes=2',
        f'--config.process_id={i}',
      ],
      cwd=cwd,
      env=_env(1),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  errors, codes = [], []
  for p in procs:
    try:
      _, err = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      p.kill()
      _, err = p.communicate()
    errors.append(err)
    codes.append(p.returncode)
  return errors, codes


def test_two_processes_match_one_process_with_two_devices(tmp_path, tiny_flags, repo_root):
  flags = [f for f in tiny_flags if not f.startswith('--config.batch_size')]
  flags.append('--config.batch_size=32')
  single = str(tmp_path / 'single')
  proc = subprocess.run(
    [sys.executable, 'main.py', f'--workdir={single}', *flags],
    cwd=repo_root,
    env=_env(2),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]

  multi = str(tmp_path / 'multi')
  for attempt in range(2):
    errors, codes = _run_two_processes(multi, flags, repo_root)
    handshake = 'Gloo context initialization failed' in ''.join(errors)
    if all(c == 0 for c in codes) or not handshake or attempt == 1:
      break
    # Only the collectives' 30 s handshake timing out on a loaded machine is retried.
    shutil.rmtree(multi, ignore_errors=True)
  for code, err in zip(codes, errors, strict=True):
    assert code == 0, err[-3000:]
  assert 'process 1 of 2' in errors[1]
  one, two = _summary(single), _summary(multi)
  assert two['steps'] == one['steps']
  if two['params_sha256'] == one['params_sha256']:
    return  # Bit for bit, as on the 2-core machine.
  # With fewer cores than devices (e.g. pinned to one core), XLA reduces the gradients of
  # the two layouts in another order: float32 rounding may differ, and a latent weight on a
  # decision threshold may take the neighbouring level. The run must still be the same one:
  # the same accuracy and loss to rounding, the same sparsity in every layer to a few weights.
  assert two['test_accuracy'] == pytest.approx(one['test_accuracy'], abs=2 / 128)
  assert two['test_loss'] == pytest.approx(one['test_loss'], rel=1e-2)
  assert two['per_layer_sparsity'].keys() == one['per_layer_sparsity'].keys()
  for name, value in one['per_layer_sparsity'].items():
    assert two['per_layer_sparsity'][name] == pytest.approx(value, abs=2e-3), name
