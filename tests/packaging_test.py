"""Packaging: a light core (`pip install ec2t_jax`), a complete program (`[train]`).

The slow tests install the package into fresh virtual environments (pip needs its index
or the local wheelhouse; without either they are skipped) or run the installed program.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Imported by the training program, the models, export, report or the PyTorch converter:
# never by `import ec2t_jax`.
HEAVY = (
  'flax',
  'orbax',
  'grain',
  'tensorflow_datasets',
  'tensorflow',
  'matplotlib',
  'ml_collections',
  'constriction',
  'torch',
  'onnx',
  'onnxruntime',
)

# One EC2T step on a tiny parameter dict; prints the kernel's distinct values.
CORE_STEP = textwrap.dedent(
  """
  import json
  import jax.numpy as jnp
  import numpy as np
  import optax
  import ec2t_jax

  params = {'k': jnp.linspace(-1.0, 1.0, 64).reshape(8, 8), 'b': jnp.zeros(8)}
  tx = ec2t_jax.ec2t(lambda p: {'k': True, 'b': False})
  state = tx.init(params)
  params = ec2t_jax.ternarize(params, state)
  grads = {'k': jnp.full((8, 8), 0.01), 'b': jnp.ones(8)}
  updates, state = tx.update(grads, state, params)
  params = optax.apply_updates(params, updates)
  print(json.dumps(sorted(set(np.asarray(params['k']).ravel().tolist()))))
  """
)


def _run(args, **kwargs):
  """subprocess.run with captured text output and a CPU-only JAX."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PIP_DISABLE_PIP_VERSION_CHECK': '1'}
  for name in ('PYTHONPATH', 'VIRTUAL_ENV'):
    env.pop(name, None)
  return subprocess.run(args, capture_output=True, text=True, env=env, **kwargs)


@pytest.mark.parametrize('module', ['ec2t_jax', 'ec2t_jax.configs', 'ec2t_jax.main'])
def test_core_imports_none_of_the_extras(module):
  code = (
    f'import json, sys; import {module}; '
    f'print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))'
  )
  proc = _run([sys.executable, '-c', code], cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.splitlines()[-1]) == []


def _copy_sources(destination):
  """The files `pip install` builds from, outside the checkout (no build/ or egg-info there)."""
  os.makedirs(destination)
  for name in ('setup.cfg', 'pyproject.toml', 'README.md'):
    shutil.copy(os.path.join(REPO, name), destination)
  shutil.copytree(
    os.path.join(REPO, 'ec2t_jax'),
    os.path.join(destination, 'ec2t_jax'),
    ignore=shutil.ignore_patterns('__pycache__', '*.pyc', '*.egg-info'),
  )
  return destination


@pytest.mark.slow
def test_fresh_install_without_extras_is_the_optimizer_only(tmp_path):
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True, timeout=300)
  python = str(venv / 'bin' / 'python')
  pip = [python, '-m', 'pip', '--timeout', '15', '--retries', '1']
  # A quick look at the index first: a small pure-Python wheel, no dependencies.
  probe = _run([*pip, 'download', '--no-deps', '--dest', str(tmp_path / 'probe'), 'optax'])
  if probe.returncode != 0:
    reason = (probe.stderr.strip().splitlines() or ['no output'])[-1]
    pytest.skip(f'pip cannot reach a package index: {reason}')

  source = _copy_sources(str(tmp_path / 'src'))
  install = _run([*pip, 'install', '-q', source], timeout=1200)
  assert install.returncode == 0, install.stderr[-4000:]

  step = _run([python, '-c', CORE_STEP], cwd=str(tmp_path), timeout=300)
  assert step.returncode == 0, step.stderr[-4000:]
  values = json.loads(step.stdout.splitlines()[-1])
  assert 2 <= len(values) <= 3 and 0.0 in values, values  # Exactly ternary after a step.

  found = _run(
    [
      python,
      '-c',
      'import importlib.util, json; '
      f'print(json.dumps([m for m in {HEAVY!r} if importlib.util.find_spec(m)]))',
    ],
    cwd=str(tmp_path),
    timeout=120,
  )
  assert found.returncode == 0, found.stderr[-2000:]
  assert json.loads(found.stdout.splitlines()[-1]) == []

  # The console script is there, and says which extra the program needs.
  train = _run(
    [str(venv / 'bin' / 'ec2t-train'), '--config=mnist:smoke', f'--workdir={tmp_path / "w"}'],
    cwd=str(tmp_path),
    timeout=300,
  )
  assert train.returncode == 1
  assert "pip install 'ec2t_jax[train]'" in train.stderr
  assert 'Traceback' not in train.stderr
  assert not (tmp_path / 'w').exists()


@pytest.mark.slow
def test_program_finds_a_packaged_recipe_outside_the_repository(tmp_path):
  # One spelling end to end; tests/configs_test.py resolves every spelling in-process.
  config = 'mnist:smoke'
  # A bad override fails after the recipe is loaded: the recipe was found, nothing trains.
  proc = _run(
    [
      sys.executable,
      '-m',
      'ec2t_jax.main',
      f'--config={config}',
      f'--workdir={tmp_path / "w"}',
      '--config.ec2t.gama=0.1',
    ],
    cwd=str(tmp_path),
    timeout=300,
  )
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith('error: bad flag:')
  assert 'gama' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'w').exists()


@pytest.mark.slow
def test_program_refuses_a_config_that_is_neither_a_file_nor_a_recipe(tmp_path):
  proc = _run(
    [sys.executable, os.path.join(REPO, 'main.py'), '--config=nope:x', f'--workdir={tmp_path}'],
    cwd=str(tmp_path),
    timeout=300,
  )
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
    "error: no config file 'nope', and it names no packaged recipe "
    '(mnist, cifar10, cifar100, imagenet, default; e.g. --config=mnist:smoke)'
  )


def test_the_training_extra_brings_what_the_compilation_cache_needs():
  """JAX's persistent cache reads and sizes its entries under filelock; [train] installs it."""
  from importlib import metadata

  train = [r for r in metadata.requires('ec2t_jax') or [] if 'extra == "train"' in r]
  assert any(r.startswith('filelock') for r in train), train


@pytest.mark.slow
def test_a_second_run_reads_the_compilation_cache(tmp_path):
  """Two smoke runs on one cache: the first writes entries, the second only reads them."""
  cache = tmp_path / 'cache'
  flags = [
    '--config=configs/mnist.py:smoke',
    f'--config.compilation_cache_dir={cache}',
  ]
  # As a user runs it: without the suite's own cache and compiler settings (conftest.py).
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(('JAX_COMPILATION_CACHE', 'JAX_PERSISTENT_CACHE', 'JAX_DISABLE_MOST'))
    and k not in ('XLA_FLAGS', 'PYTHONPATH')
  }
  runs = []
  for name in ('a', 'b'):
    proc = subprocess.run(
      [sys.executable, 'main.py', *flags, f'--workdir={tmp_path / name}'],
      cwd=REPO,
      # Every compilation stored (not only those of a second or more, which a busy machine
      # may or may not reach): the second run must find each one.
      env={**env, 'JAX_PLATFORMS': 'cpu', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'},
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'compilation cache' not in proc.stderr.replace('persistent compilation cache:', ''), (
      proc.stderr[-3000:]
    )
    runs.append(sorted(p.name for p in cache.iterdir()))
  assert runs[0], 'the first run wrote no cache entry'
  new = sorted(set(runs[1]) - set(runs[0]))
  assert not new, f'the second run compiled {len(new)} programs again'
