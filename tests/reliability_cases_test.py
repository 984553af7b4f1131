"""The bad-input and fault table of docs/reliability.md: every row is a test here.

`CASES` is the single list of cases. Each `@case(...)` below registers one row
(what was tried, the command, what the program answers now) and the check
that proves the answer; `test_case` runs every check, and `test_table_is_current`
asserts that the table in docs/reliability.md is exactly the one `CASES`
renders: no row without a test, no test without a row. After changing a case,
rewrite the table with

    .venv/bin/python tests/reliability_cases_test.py

Rows C01-C44 are adversarial cases tried on the first version; rows B01-B16
are the bad settings refused before training. Rows S (silent wrong numbers), L
(found late), R (resumes that mix runs), E (clear errors) and A (replaced
files) live in `tests/reliability_cases_input.py` and
`tests/reliability_cases_resume.py`, registered in the same `CASES`
(`tests/reliability_registry.py`). Rows that need a full disk, a
read-only mount or a missing accelerator simulate it (monkeypatched writes or
devices); their answers say so.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from reliability_registry import CASES, CHECKS, case  # tests/ is on sys.path

import ec2t_jax
from ec2t_jax import export, models, report, scoring, transforms
from ec2t_jax.scoring import __main__ as scoring_cli
from ec2t_jax.training import checkpoint as checkpoint_lib
from ec2t_jax.training import datasets, metric_writers, train
from ec2t_jax.training import lock as lock_lib
from ec2t_jax.training import parse as parse_lib
from ec2t_jax.training import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, 'docs', 'reliability.md')
BEGIN, END = '<!-- cases:begin -->', '<!-- cases:end -->'


# --- helpers ---------------------------------------------------------------------------------


def _copy(trained_workdir, tmp_path, name='run'):
  """A writable copy of the session's finished tiny run."""
  target = str(tmp_path / name)
  shutil.copytree(trained_workdir, target)
  return target


def _summary(workdir):
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def _snapshot(root):
  """Every file under `root` with its size, mtime and content hash."""
  out = {}
  for d, _, files in os.walk(root):
    for name in files:
      path = os.path.join(d, name)
      st = os.stat(path)
      with open(path, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
      out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns, digest)
  return out


def _hold_lock(workdir):
  os.makedirs(workdir, exist_ok=True)
  return workdir_lib.WorkdirLock(workdir).acquire()


def _busy_message():
  return rf'is in use by pid {os.getpid()} on host {re.escape(repr(socket.gethostname()))}'


def _at_batches(monkeypatch, at_calls, action):
  """Calls `action()` when the trainer shards each listed training batch (1-based)."""
  original = train.to_global
  calls = {'n': 0}

  def to_global(batch, sharding):
    if 'mask' not in batch:  # Training batches only; evaluation batches carry a mask.
      calls['n'] += 1
      if calls['n'] in at_calls:
        action()
    return original(batch, sharding)

  monkeypatch.setattr(train, 'to_global', to_global)


def _signal_at(monkeypatch, signum, *at_calls):
  """The trainer receives `signum` when it shards each listed training batch (1-based)."""
  _at_batches(monkeypatch, at_calls, lambda: os.kill(os.getpid(), signum))


@pytest.fixture
def signal_at(monkeypatch):
  """`arm(signum, n, ...)`: the trainer receives `signum` at its n-th training batch(es)."""
  return lambda signum, *at_calls: _signal_at(monkeypatch, signum, *at_calls)


def _variables(seed=0):
  """Small export input: two ternary kernels, a bias, BatchNorm statistics."""
  rng = np.random.default_rng(seed)
  tern = rng.choice([-0.25, 0.0, 0.5], size=(3, 3, 4, 8)).astype(np.float32)
  return {
    'params': {
      'conv': {'kernel': tern, 'bias': rng.standard_normal(8).astype(np.float32)},
      'dense': {'kernel': rng.choice([-0.1, 0.0, 0.1], size=(32, 10)).astype(np.float32)},
    },
    'batch_stats': {'bn': {'mean': np.zeros(8, np.float32), 'var': np.ones(8, np.float32)}},
  }


def _forge(data, edit=None, manifest_bytes=None):
  """`data` with its manifest edited (or replaced) and the checksum recomputed."""
  header = export._HEADER
  magic, version, flags, mlen, _ = header.unpack_from(data)
  manifest = json.loads(data[header.size : header.size + mlen])
  payload = data[header.size + mlen : -32]
  if edit is not None:
    edit(manifest)
  if manifest_bytes is None:
    manifest_bytes = json.dumps(manifest).encode()
  body = header.pack(magic, version, flags, len(manifest_bytes), len(payload))
  body += manifest_bytes + payload
  return body + hashlib.sha256(body).digest()


def _ternary_tx(**kwargs):
  return transforms.ternary_training(**kwargs)


def _params():
  return {'w': jnp.linspace(-1.0, 1.0, 24).reshape(4, 6), 'b': jnp.zeros(6)}


def _mask():
  return {'w': True, 'b': False}


def _torch_lenet_state_dict():
  from ec2t_jax.models import pytorch

  model = models.create('lenet5', num_classes=10)
  x = jnp.zeros((1, *models.input_shape('lenet5')))
  variables = model.init(jax.random.key(0), x, train=False)
  return pytorch.to_pytorch(variables, 'lenet5')


def _cli(main, argv, capsys):
  code = main(argv)
  out = capsys.readouterr()
  return code, out.out, out.err


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


def _refused_untouched(tmp_path, tiny_mnist, overrides, error, message):
  """The config is refused with `message`; the workdir keeps only what it held."""
  workdir = tmp_path / f'work{len(list(tmp_path.glob("work*")))}'
  workdir.mkdir()
  (workdir / 'keep.txt').write_text('untouched')
  with pytest.raises(error, match=message):
    train.train_and_evaluate(tiny_mnist(**overrides), str(workdir))
  assert sorted(os.listdir(workdir)) == ['keep.txt']
  assert (workdir / 'keep.txt').read_text() == 'untouched'


# --- C: adversarial cases tried on the first version -----------------------------------------


@case(
  'C01',
  'Two runs started at the same moment on one workdir.',
  'two `python main.py --config=configs/mnist.py:smoke --workdir=W` at once',
  'The second is refused at once, before it writes anything: `error: workdir W is in use by '
  'pid P on host H (started T: COMMAND); wait for that run to end or stop it, or pass another '
  '--workdir`. (Two real processes: `tests/reliability_test.py`.)',
)
def check_c01(tmp_path, tiny_mnist):
  workdir = str(tmp_path / 'run')
  lock = _hold_lock(workdir)  # The other run, already past its claim.
  try:
    with pytest.raises(workdir_lib.WorkdirBusyError, match=_busy_message()):
      train.train_and_evaluate(tiny_mnist(), workdir)
    assert os.listdir(workdir) == [workdir_lib.LOCK_FILE]
  finally:
    lock.release()
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))


@case(
  'C02',
  'A second run started while the first is training (16 s later, long config).',
  'the same command again while the first runs',
  'Refused at once with the holder named (as C01); the first run and its checkpoints are '
  'untouched.',
)
def check_c02(tmp_path, tiny_mnist, trained_workdir):
  workdir = _copy(trained_workdir, tmp_path)
  before = _snapshot(workdir)
  lock = _hold_lock(workdir)
  try:
    with pytest.raises(workdir_lib.WorkdirBusyError, match=_busy_message()):
      train.train_and_evaluate(tiny_mnist(), workdir)
  finally:
    lock.release()
  assert _snapshot(workdir) == before


@case(
  'C03',
  'Two runs with different gamma (0.15, 0.3) started together on one workdir.',
  'both commands at once, one with `--config.ec2t.gamma=0.3`',
  'The one that comes second is refused by the lock (C01); once the first has ended, a run of '
  'another config is refused by the config check (`holds a run of a different config '
  '(ec2t.gamma: 0.15 -> 0.3)`).',
)
def check_c03(tmp_path, tiny_mnist):
  workdir = str(tmp_path / 'run')
  _claim(tiny_mnist(), workdir).release()
  lock = _hold_lock(workdir)
  try:
    with pytest.raises(workdir_lib.WorkdirBusyError):
      train.train_and_evaluate(tiny_mnist(**{'ec2t.gamma': 0.3}), workdir)
  finally:
    lock.release()
  with pytest.raises(ValueError, match=r'different config \(ec2t.gamma: 0.15 -> 0.3\)'):
    train.train_and_evaluate(tiny_mnist(**{'ec2t.gamma': 0.3}), workdir)


@case(
  'C04',
  'Workdir on a read-only filesystem: new, empty, or holding a finished run.',
  '`main.py` on the read-only W; `python -m ec2t_jax.scoring|export|report --workdir W`',
  'Training is refused in one line (`workdir W is not writable; pass a --workdir you can write '
  'to`); score, export and report read the finished run and write nothing into it. (Simulated: '
  'the tests run as root, so `os.access` is patched to say read-only.)',
)
def check_c04(tmp_path, tiny_mnist, trained_workdir, monkeypatch, capsys):
  workdir = _copy(trained_workdir, tmp_path)
  before = _snapshot(workdir)
  real_access = os.access
  monkeypatch.setattr(
    os, 'access', lambda p, mode: False if mode == os.W_OK else real_access(p, mode)
  )
  with pytest.raises(ValueError, match='is not writable'):
    train.train_and_evaluate(tiny_mnist(), workdir)
  out_dir = tmp_path / 'out'
  out_dir.mkdir()
  assert scoring_cli.main(['--workdir', workdir]) == 0
  assert export.main(['--workdir', workdir, '--out', str(out_dir / 'a.ec2t')]) == 0
  assert report.main(['--workdir', workdir, '--out', str(out_dir / 'report')]) == 0
  capsys.readouterr()
  assert _snapshot(workdir) == before


@case(
  'C05',
  'The workdir is a file, or lies below a file.',
  '`main.py --workdir=FILE` and `--workdir=FILE/sub`',
  'One line each: `workdir FILE is not a directory; pass a --workdir directory` and '
  '`workdir FILE/sub cannot be created: Not a directory`.',
)
def check_c05(tmp_path, tiny_mnist):
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  with pytest.raises(ValueError, match='cannot be created: Not a directory'):
    train.train_and_evaluate(tiny_mnist(), str(blocker / 'sub'))
  with pytest.raises(ValueError, match='cannot be created|is not a directory'):
    train.train_and_evaluate(tiny_mnist(), str(blocker))
  assert blocker.read_text() == 'x'


@case(
  'C06',
  '`checkpoints` is a file inside the workdir.',
  '`touch W/checkpoints; python main.py ... --workdir=W`',
  'Refused before any step: `workdir W: W/checkpoints must be a directory but is not one; move '
  'it away, or pass another --workdir` (before: 5 steps, then `[Errno 20] Not a directory`).',
)
def check_c06(tmp_path, tiny_mnist, monkeypatch):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'checkpoints').write_text('not a directory')
  monkeypatch.setattr(train, 'to_global', lambda *a: pytest.fail('trained a step'))
  with pytest.raises(ValueError, match='checkpoints.* must be a directory'):
    train.train_and_evaluate(tiny_mnist(), str(workdir))


@case(
  'C07',
  'The disk fills up while a checkpoint is written; then space is freed and the run restarted.',
  '`main.py` on a 2 MB filesystem, then again after enlarging it',
  'One line: `[Errno 28] checkpoint 4 could not be written to W/checkpoints (OSError: No space '
  'left on device); the checkpoints on disk ([2, 3]) are intact: free space or fix the '
  'filesystem, then rerun the same command to resume`; the lock is released; the rerun resumes '
  "bit-identical to an uninterrupted run. (Simulated: orbax's JSON write raises ENOSPC in the "
  'middle of the save.)',
)
def check_c07(tmp_path, tiny_mnist, trained_workdir, monkeypatch):
  workdir = str(tmp_path / 'run')
  original = ocp.JsonCheckpointHandler.async_save

  def full_disk(self, directory, *args, **kwargs):
    if '/checkpoints/4' in str(directory):
      raise OSError(errno.ENOSPC, 'No space left on device')
    return original(self, directory, *args, **kwargs)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, 'async_save', full_disk)
  with pytest.raises(OSError, match='checkpoint 4 could not be written') as info:
    train.train_and_evaluate(tiny_mnist(), workdir)
  assert info.value.errno == errno.ENOSPC
  assert 'rerun the same command to resume' in str(info.value)
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))
  monkeypatch.setattr(ocp.JsonCheckpointHandler, 'async_save', original)
  resumed = train.train_and_evaluate(tiny_mnist(), workdir)
  assert resumed['params_sha256'] == _summary(trained_workdir)['params_sha256']
  leftovers = [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if 'tmp' in n]
  assert not leftovers


@case(
  'C08',
  '`rm -rf W/checkpoints` while the run trains.',
  '`rm -rf W/checkpoints` during `main.py`',
  'The directory is recreated at the next save and the run finishes bit-identical to an '
  'uninterrupted one.',
)
def check_c08(tmp_path, tiny_mnist, trained_workdir, monkeypatch):
  workdir = str(tmp_path / 'run')
  _at_batches(monkeypatch, (5,), lambda: shutil.rmtree(os.path.join(workdir, 'checkpoints')))
  summary = train.train_and_evaluate(tiny_mnist(), workdir)
  assert summary['params_sha256'] == _summary(trained_workdir)['params_sha256']


@case(
  'C09',
  'Resume with a changed gamma, max_to_keep or half_precision.',
  '`main.py ... --config.ec2t.gamma=0.3` (or `max_to_keep=5`, `half_precision=True`) on W',
  'Refused before any step: `workdir W holds a run of a different config (ec2t.gamma: 0.15 -> '
  '0.3); use another --workdir, or --config.overwrite=True to start over there (the old run is '
  'moved aside)`.',
)
def check_c09(tmp_path, tiny_mnist):
  workdir = str(tmp_path / 'run')
  _claim(tiny_mnist(), workdir).release()
  before = _snapshot(workdir)
  for change, shown in (
    ({'ec2t.gamma': 0.3}, 'ec2t.gamma: 0.15 -> 0.3'),
    ({'max_to_keep': 5}, 'max_to_keep: 2 -> 5'),
    ({'half_precision': True}, 'half_precision: False -> True'),
  ):
    with pytest.raises(ValueError, match=re.escape(shown)):
      train.train_and_evaluate(tiny_mnist(**change), workdir)
  assert _snapshot(workdir) == before


@case(
  'C10',
  '`--config.overwrite=True` with a new gamma on a finished run.',
  '`main.py ... --config.ec2t.gamma=0.3 --config.overwrite=True` on a finished W',
  'The old run (checkpoints, best/, fp_variables/, metrics, TensorBoard files, summary.json, '
  'config.json) is moved to `W/overwritten-<time>/` with a warning, and the run starts over at '
  'step 0: its summary, checkpoints and best/ are bit-identical to a fresh run with gamma 0.3 '
  '(before: 0 steps "resumed", summary and config claimed the new gamma, best/ kept the old '
  'network).',
  slow=True,
)
def check_c10(tmp_path, tiny_mnist, trained_workdir):
  workdir = _copy(trained_workdir, tmp_path)
  old = _summary(workdir)
  config = tiny_mnist(**{'ec2t.gamma': 0.3, 'overwrite': True})
  summary = train.train_and_evaluate(config, workdir)
  fresh = train.train_and_evaluate(tiny_mnist(**{'ec2t.gamma': 0.3}), str(tmp_path / 'fresh'))
  assert summary['params_sha256'] == fresh['params_sha256'] != old['params_sha256']
  assert summary['gamma'] == 0.3 and summary['steps'] == 9
  moved = [n for n in os.listdir(workdir) if n.startswith('overwritten-')]
  assert len(moved) == 1
  assert _summary(os.path.join(workdir, moved[0])) == old
  best = workdir_lib.load_workdir(workdir, best=True)
  fresh_best = workdir_lib.load_workdir(str(tmp_path / 'fresh'), best=True)
  assert best.step == fresh_best.step
  pairs = zip(jax.tree.leaves(best.variables), jax.tree.leaves(fresh_best.variables), strict=True)
  for a, b in pairs:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rows = metric_writers.read_metrics(workdir)
  assert min(r['step'] for r in rows) <= 2  # The new run's log starts at its first steps.


@case(
  'C11',
  'Ctrl-C (SIGINT) during training.',
  'Ctrl-C once during `main.py`, then the same command again',
  'The first Ctrl-C saves a checkpoint at the current step and the run stops cleanly (exit 0, '
  '`Stopped at step 5 after SIGINT; rerun the same command to resume.`); the rerun resumes '
  'bit-identical to an uninterrupted run. A second Ctrl-C stops at once (KeyboardInterrupt), '
  'keeping the checkpoints already written.',
)
def check_c11(tmp_path, tiny_mnist, trained_workdir, signal_at):
  workdir = str(tmp_path / 'run')
  handler = signal.getsignal(signal.SIGINT)
  signal_at(signal.SIGINT, 5)
  assert train.train_and_evaluate(tiny_mnist(), workdir) == {'preempted': True, 'step': 5}
  assert signal.getsignal(signal.SIGINT) is handler
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))
  resumed = train.train_and_evaluate(tiny_mnist(), workdir)
  assert resumed['params_sha256'] == _summary(trained_workdir)['params_sha256']


@case(
  'C12',
  'SIGTERM, then resume, on 2 simulated devices.',
  '`XLA_FLAGS=--xla_force_host_platform_device_count=2 main.py ... --config.num_devices=2`, '
  'SIGTERM, rerun',
  'Stops with a checkpoint; the resumed run is bit-identical to an uninterrupted 2-device run.',
  slow=True,
)
def check_c12(tmp_path, tiny_mnist, signal_at):
  if jax.device_count() < 2:
    pytest.skip('needs 2 (simulated) devices')
  config = tiny_mnist(num_devices=2)
  reference = train.train_and_evaluate(config, str(tmp_path / 'a'))
  signal_at(signal.SIGTERM, 4)
  assert train.train_and_evaluate(config, str(tmp_path / 'b'))['preempted']
  resumed = train.train_and_evaluate(config, str(tmp_path / 'b'))
  assert resumed['params_sha256'] == reference['params_sha256']


@case(
  'C13',
  '`.ec2t` files damaged: every byte flipped, truncated at every length, garbage appended, '
  'empty, random bytes, huge sizes in the header.',
  '`export.load(path)` on each damaged file',
  'Always a one-line `ValueError` (checksum mismatch, truncated, not an export, ...); never '
  'wrong weights.',
)
def check_c13():
  for entropy_coding in (False, True):
    data, _ = export.dumps(_variables(), entropy_coding=entropy_coding)
    export.loads(data)
    damaged = [data[:n] for n in range(len(data))]
    damaged += [data + b'x', b'', np.random.default_rng(0).bytes(len(data))]
    for i in range(len(data)):
      damaged.append(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
    header = bytearray(data)
    header[12:16] = (2**32 - 1).to_bytes(4, 'little')
    damaged.append(bytes(header))
    for blob in damaged:
      with pytest.raises(ValueError):
        export.loads(blob)


@case(
  'C14',
  '`.ec2t` forged with a recomputed checksum: an entropy-coded entry of 2^36 weights, dtype '
  'int8 or object, a manifest nested 100,000 levels deep.',
  '`export.load(forged)`',
  'One-line `ValueError`s: `corrupt or forged export: its entries declare N bytes of values, '
  'more than 65536x the F-byte file` (every size is bounded by the bytes present, before any '
  "allocation); `corrupt manifest: params/conv/kernel has dtype 'int8'; this field holds one "
  'of [...]` (only the dtypes the writer produces); `corrupt manifest: nested more than 32 '
  'levels deep` (before: a 274 GB allocation aborted the process, int8/object came back '
  'silently, RecursionError).',
)
def check_c14():
  data, _ = export.dumps(_variables(), entropy_coding=True)

  def huge(manifest):
    entry = next(e for e in manifest['entries'] if e['kind'] == 'ternary_ec')
    entry['shape'], entry['counts'] = [2**36], [0, 2**36, 0]

  with pytest.raises(ValueError, match='corrupt or forged export: its entries declare'):
    export.loads(_forge(data, huge))

  def mixed_counts(manifest):  # Plausible size, but more information than the stream holds.
    entry = next(e for e in manifest['entries'] if e['kind'] == 'ternary_ec')
    entry['shape'], entry['counts'] = [300_000], [100_000, 100_000, 100_000]

  with pytest.raises(ValueError, match='entropy-coded entries need at least'):
    export.loads(_forge(data, mixed_counts))
  for field, value, kind in (
    ('dtype', 'int8', 'ternary_ec'),
    ('dtype', 'object', 'dense'),
    ('stored_dtype', 'object', 'dense'),
    ('stored_dtype', 'int8', 'dense'),
    ('centroid_dtype', 'float64', 'ternary_ec'),
  ):

    def retype(manifest, field=field, value=value, kind=kind):
      entry = next(e for e in manifest['entries'] if e['kind'] == kind)
      entry[field] = value

    with pytest.raises(ValueError, match=f"has dtype '{value}'"):
      export.loads(_forge(data, retype))
  deep = b'{"entries": [], "x": ' + b'[' * 100_000 + b']' * 100_000 + b'}'
  with pytest.raises(ValueError, match='nested more than 32 levels'):
    export.loads(_forge(data, manifest_bytes=deep))
  shallow_deep = b'{"entries": [], "x": ' + b'[' * 40 + b']' * 40 + b'}'
  with pytest.raises(ValueError, match='nested more than 32 levels'):
    export.loads(_forge(data, manifest_bytes=shallow_deep))


@case(
  'C15',
  "`export` with float16 full-precision leaves or centroids, for values outside float16's "
  'range: a bias of 1e6, a BatchNorm variance of 3e5, centroids of 1e5, a leaf of 1e-9.',
  "`export.save(path, variables, fp_dtype='float16', centroid_dtype='float16')`; "
  '`python -m ec2t_jax.export --fp16 --fp16-centroids`',
  'Those leaves are stored in float32 and named (`ExportStats.float32_leaves`, a warning, and '
  '`kept in float32 (float16 cannot hold their values within 2^-11): ...` on the command line); '
  'they load back exactly, every other leaf is float16 (before: inf and 0 with only a numpy '
  'warning).',
)
def check_c15():
  variables = _variables()
  variables['params']['conv']['bias'][0] = 1e6
  variables['batch_stats']['bn']['var'][:] = 3e5
  variables['params']['tiny'] = {'scale': np.full(4, 1e-9, np.float32)}
  variables['params']['dense']['kernel'] = np.where(
    variables['params']['dense']['kernel'] > 0,
    np.float32(1e5),
    variables['params']['dense']['kernel'],
  ).astype(np.float32)
  data, stats = export.dumps(variables, fp_dtype='float16', centroid_dtype='float16')
  assert set(stats.float32_leaves) == {
    'params/conv/bias',
    'batch_stats/bn/var',
    'params/tiny/scale',
    'params/dense/kernel',
  }
  loaded = export.loads(data)
  for name in stats.float32_leaves:
    *path, leaf = name.split('/')
    got, want = loaded, variables
    for key in path:
      got, want = got[key], want[key]
    np.testing.assert_array_equal(got[leaf], want[leaf], err_msg=name)
  manifest = json.loads(
    data[export._HEADER.size : export._HEADER.size + export._HEADER.unpack_from(data)[3]]
  )
  stored = {
    '/'.join(e['path']): e.get('stored_dtype', e.get('centroid_dtype')) for e in manifest['entries']
  }
  assert stored['batch_stats/bn/mean'] == 'float16'
  assert stored['params/conv/kernel'] == 'float16'  # Centroids 0.5, 0.25: exact in float16.


@case(
  'C16',
  '`--out` / `--json` into a missing directory or onto a directory.',
  '`python -m ec2t_jax.export --out /missing/x.ec2t`; `scoring --json DIR`; `report --out FILE`',
  "One line before any work, exit 2: `error: --out '/missing/x.ec2t': its directory does not "
  "exist`, `error: --json 'DIR' is a directory, not a file`, `error: --out 'FILE' is a file, "
  'not a directory`.',
)
def check_c16(tmp_path, trained_workdir, capsys):
  missing = str(tmp_path / 'missing' / 'x')
  a_file = tmp_path / 'file'
  a_file.write_text('x')
  for main, argv, message in (
    (export.main, ['--out', missing], 'its directory does not exist'),
    (export.main, ['--out', str(tmp_path)], 'is a directory, not a file'),
    (scoring_cli.main, ['--json', missing], 'its directory does not exist'),
    (scoring_cli.main, ['--json', str(tmp_path)], 'is a directory, not a file'),
    (report.main, ['--out', str(a_file)], 'is a file, not a directory'),
  ):
    code, out, err = _cli(main, ['--workdir', trained_workdir, *argv], capsys)
    assert code == 2 and message in err and err.count('\n') == 1, err
    assert not out


@case(
  'C17',
  'Export while the run is still training (its newest checkpoint is being rotated).',
  '`python -m ec2t_jax.export --workdir W` during `main.py`',
  'The newest checkpoint that reads back intact is exported, with a warning naming the one '
  'that could not be read; the output names the step (`checkpoint 8: ...`); training is '
  'unharmed (before: `Checkpoint at .../120 not found` in 5 of 6 tries). (Simulated: the '
  "newest checkpoint's state is removed, as by a rotation in progress.)",
)
def check_c17(tmp_path, trained_workdir, capsys, caplog):
  workdir = _copy(trained_workdir, tmp_path)
  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=2)
  newest, older = ckpt.steps()[-1], ckpt.steps()[-2]
  ckpt.close()
  shutil.rmtree(os.path.join(workdir, 'checkpoints', str(newest), 'state'))
  with caplog.at_level('WARNING'):
    code, out, err = _cli(
      export.main, ['--workdir', workdir, '--out', str(tmp_path / 'a.ec2t')], capsys
    )
  assert code == 0, err
  assert f'checkpoint {older}:' in out
  assert f'using checkpoint {older} instead' in caplog.text
  assert export.load(str(tmp_path / 'a.ec2t'))['params']


@case(
  'C18',
  '`from_pytorch` with a wrong or empty model name, a missing key, a wrong shape, an extra key, '
  "a bare tensor, a list, a DataParallel `module.` prefix, a `{'state_dict': ...}` wrapper.",
  '`ec2t_jax.models.pytorch.from_pytorch(state_dict_or_path, name)`',
  'Clear errors (`cannot convert model ...; supported models: [...]`, `state_dict does not '
  'match lenet5:` with missing / unexpected / wrong-shape sections, `holds a Tensor, not a '
  'state_dict`); the prefix and the wrapper are accepted.',
)
def check_c18(tmp_path):
  torch = pytest.importorskip('torch')
  from ec2t_jax.models import pytorch

  sd = _torch_lenet_state_dict()
  for name in ('resnet7', ''):
    with pytest.raises(ValueError, match='cannot convert model'):
      pytorch.from_pytorch(sd, name)
  missing = {k: v for k, v in sd.items() if k != 'conv1.bias'}
  with pytest.raises(ValueError, match=r'missing \(1\)'):
    pytorch.from_pytorch(missing, 'lenet5')
  with pytest.raises(ValueError, match=r'wrong shape \(1\)'):
    pytorch.from_pytorch({**sd, 'conv1.bias': np.zeros(7, np.float32)}, 'lenet5')
  with pytest.raises(ValueError, match=r'unexpected \(1\)'):
    pytorch.from_pytorch({**sd, 'extra.weight': np.zeros(3, np.float32)}, 'lenet5')
  for obj, kind in ((torch.zeros(3), 'Tensor'), ([torch.zeros(3)], 'list')):
    path = str(tmp_path / f'{kind}.pth')
    torch.save(obj, path)
    with pytest.raises(ValueError, match=f'holds a {kind}, not a state_dict'):
      pytorch.from_pytorch(path, 'lenet5')
  path = str(tmp_path / 'wrapped.pth')
  torch.save({'state_dict': {f'module.{k}': torch.from_numpy(v) for k, v in sd.items()}}, path)
  assert pytorch.from_pytorch(path, 'lenet5')['params']['conv1']['kernel'].shape == (5, 5, 1, 6)


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


@case(
  'C19',
  '`from_pytorch` on malicious pickles (`__reduce__`) and on a pickled `nn.Module`.',
  "`from_pytorch('evil.pth', 'lenet5')`",
  "Refused without running any of the file's code (`weights_only=True`): `... is not a plain "
  'PyTorch state_dict (Trying to load unsupported GLOBAL ...): it holds objects that only a full '
  'unpickling, which runs code from the file, could rebuild; save the weights with '
  'torch.save(model.state_dict(), path)`.',
)
def check_c19(tmp_path):
  torch = pytest.importorskip('torch')
  from ec2t_jax.models import pytorch

  marker = str(tmp_path / 'code_ran')
  evil = str(tmp_path / 'evil.pth')
  with open(evil, 'wb') as f:
    pickle.dump({'conv1.weight': _Exploit(marker)}, f)
  module = str(tmp_path / 'module.pth')
  torch.save(torch.nn.Linear(2, 2), module)
  for path in (evil, module):
    with pytest.raises(ValueError, match='is not a plain PyTorch state_dict|cannot be read'):
      pytorch.from_pytorch(path, 'lenet5')
  assert not os.path.exists(marker)


@case(
  'C20',
  '`from_pytorch` and `--config.init_from` on a text, empty, random or truncated `.pth`.',
  '`main.py ... --config.init_from=broken.pth --config.fp.num_epochs=0`',
  'One line naming the file and what is wrong, before the workdir is touched: '
  "`config.init_from='broken.pth': 'broken.pth' cannot be read as a PyTorch file (EOFError: "
  'no detail); is it empty, truncated, or not written by torch.save?` (before: IndexError, '
  'bare EOFError, an UnpicklingError advising weights_only=False, full tracebacks).',
)
def check_c20(tmp_path, tiny_mnist):
  torch = pytest.importorskip('torch')
  from ec2t_jax.models import pytorch

  good = str(tmp_path / 'good.pth')
  torch.save({k: torch.from_numpy(v) for k, v in _torch_lenet_state_dict().items()}, good)
  blob = open(good, 'rb').read()
  files = {
    'text': b'hello world\n',
    'empty': b'',
    'random': np.random.default_rng(0).bytes(1000),
    'truncated': blob[: len(blob) // 2],
  }
  for name, content in files.items():
    path = str(tmp_path / f'{name}.pth')
    with open(path, 'wb') as f:
      f.write(content)
    with pytest.raises(ValueError, match='cannot be read as a PyTorch file'):
      pytorch.from_pytorch(path, 'lenet5')
  workdir = tmp_path / 'run'
  config = tiny_mnist(init_from=str(tmp_path / 'empty.pth'), **{'fp.num_epochs': 0})
  with pytest.raises(ValueError, match=r'config.init_from=.*empty.pth.*cannot be read'):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


@case(
  'C21',
  '`from_pytorch` with complex64, NaN or int64 tensors, and with both `conv1.weight` and '
  '`module.conv1.weight`.',
  "`from_pytorch(state_dict, 'lenet5')`",
  'Complex: `conv1.weight is complex (complex64); the models have real weights`; NaN: '
  '`conv1.weight holds 1 NaN/inf values; is the checkpoint broken?`; both names: `state_dict '
  "holds both 'conv1.weight' and 'module.conv1.weight', which name the same tensor; keep "
  "one`; int64 values are converted to the model's float dtype (before: the imaginary part "
  'dropped, NaN accepted, the `module.` one silently won).',
)
def check_c21():
  from ec2t_jax.models import pytorch

  sd = _torch_lenet_state_dict()
  with pytest.raises(ValueError, match='conv1.weight is complex'):
    pytorch.from_pytorch({**sd, 'conv1.weight': sd['conv1.weight'].astype(np.complex64)}, 'lenet5')
  nan = sd['conv1.weight'].copy()
  nan.flat[0] = np.nan
  with pytest.raises(ValueError, match='conv1.weight holds 1 NaN/inf values'):
    pytorch.from_pytorch({**sd, 'conv1.weight': nan}, 'lenet5')
  with pytest.raises(ValueError, match="holds both 'conv1.weight' and 'module.conv1.weight'"):
    pytorch.from_pytorch({**sd, 'module.conv1.weight': sd['conv1.weight']}, 'lenet5')
  ints = {**sd, 'conv1.bias': np.arange(6, dtype=np.int64)}
  loaded = pytorch.from_pytorch(ints, 'lenet5')
  np.testing.assert_array_equal(loaded['params']['conv1']['bias'], np.arange(6, dtype=np.float32))


@case(
  'C22',
  '`from_pytorch(None)` as the model name, and LeNet-5 weights converted as `resnet20`.',
  "`from_pytorch(sd, None)`; `from_pytorch(lenet_sd, 'resnet20')`",
  "`TypeError: model_name must be a model name such as 'lenet5', got NoneType; supported: "
  "[...]`; `cannot infer num_classes: the state_dict has no 'linear.bias' (the classifier "
  'bias of resnet20), so it may be the weights of another model (its first names: [...]); check '
  'the model name, or pass num_classes`.',
)
def check_c22():
  from ec2t_jax.models import pytorch

  sd = _torch_lenet_state_dict()
  with pytest.raises(TypeError, match='model_name must be a model name'):
    pytorch.from_pytorch(sd, None)
  with pytest.raises(ValueError, match='may be the weights of another model'):
    pytorch.from_pytorch(sd, 'resnet20')


@case(
  'C23',
  'Library misuse: a mask of another structure, a selected int leaf, an empty params dict, '
  '`update` without params, `ternarize` with a plain Adam state.',
  '`ec2t_jax.ec2t(mask).init(params)` and friends',
  'Clear `ValueError`s naming the problem (`... has dtype int32; only floating-point leaves can '
  'be ternarized or pruned`, `ternary_mask selects no parameter`, `needs the current params: '
  'call update(grads, state, params)`, ...).',
)
def check_c23():
  params = _params()
  with pytest.raises(ValueError):
    ec2t_jax.ec2t({'w': True}).init(params)
  with pytest.raises(ValueError, match='only floating-point leaves'):
    ec2t_jax.ec2t({**_mask(), 'i': True}).init({**params, 'i': jnp.arange(3)})
  with pytest.raises(ValueError, match='selects no parameter'):
    ec2t_jax.ec2t({}).init({})
  tx = ec2t_jax.ec2t(_mask())
  state = tx.init(params)
  with pytest.raises(ValueError, match='needs the current params'):
    tx.update(jax.tree.map(jnp.ones_like, params), state)
  with pytest.raises(ValueError):
    ec2t_jax.ternarize(params, optax.adam(1e-3).init(params))


@case(
  'C24',
  'Library: `update` without calling `ternarize` first.',
  '`tx.update(grads, tx.init(params), params)` on the raw params',
  'The same result as with `ternarize` first (the update moves every kernel exactly onto the '
  'ternary grid).',
)
def check_c24():
  params = _params()
  tx = ec2t_jax.ec2t(_mask())
  state = tx.init(params)
  grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
  raw = optax.apply_updates(params, tx.update(grads, state, params)[0])
  ternarized = ec2t_jax.ternarize(params, state)
  first = optax.apply_updates(ternarized, tx.update(grads, state, ternarized)[0])
  np.testing.assert_array_equal(raw['w'], first['w'])


@case(
  'C25',
  "Library: a kernel's shape changed, or two layers swapped, between `init` and `update`.",
  '`tx.update(grads_of_other_shapes, state, params)`',
  "`ValueError: ternary_training: the gradient leaf ['w'] has shape (6, 4), but the optimizer "
  'state was built (by init) for shape (4, 6): the params changed shape or order between init '
  'and update; call init again with the new params` (before: `Incompatible shapes for '
  'broadcasting`).',
)
def check_c25():
  params = {'w': jnp.ones((4, 6)), 'v': jnp.ones((2, 3)), 'b': jnp.zeros(6)}
  tx = ec2t_jax.ec2t({'w': True, 'v': True, 'b': False})
  state = tx.init(params)
  changed = {**params, 'w': jnp.ones((6, 4))}
  with pytest.raises(ValueError, match=r"\['w'\] has shape \(6, 4\).*for shape \(4, 6\)"):
    tx.update(changed, state, changed)
  swapped = {**params, 'w': params['v'], 'v': params['w']}
  with pytest.raises(ValueError, match='changed shape or order between init and update'):
    tx.update(swapped, state, swapped)


@case(
  'C26',
  'Library extremes: gamma = 1e30, gradients of 1e30, bfloat16 params for many steps.',
  '`ec2t(mask, gamma=1e30)`; `update(1e30 * ones, ...)`; bfloat16 params, 50 jitted steps',
  'All zeros by design for gamma = 1e30 (the entropy term wins everywhere); finite state for '
  'huge gradients; bfloat16 stays ternary and finite.',
)
def check_c26():
  params = _params()
  tx = ec2t_jax.ec2t(_mask(), gamma=1e30)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(grads, state, params)
  assert not np.any(optax.apply_updates(params, updates)['w'])
  tx = ec2t_jax.ec2t(_mask())
  state = tx.init(params)
  ternarized = ec2t_jax.ternarize(params, state)
  huge = jax.tree.map(lambda p: 1e30 * jnp.ones_like(p), params)
  updates, state = tx.update(huge, state, ternarized)
  stepped = optax.apply_updates(ternarized, updates)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(stepped))
  assert len(np.unique(np.asarray(stepped['w']))) <= 3
  half = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  tx = ec2t_jax.ec2t(_mask())
  state = tx.init(half)
  half = ec2t_jax.ternarize(half, state)

  @jax.jit
  def step(p, s, k):
    g = jax.tree.map(lambda x: jax.random.normal(k, x.shape, x.dtype), p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for k in jax.random.split(jax.random.key(0), 50):
    half, state = step(half, state, k)
  assert half['w'].dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(half['w'], np.float32)))
  assert len(np.unique(np.asarray(half['w'], np.float32))) <= 3


@case(
  'C27',
  'Library: float16 params.',
  '`ec2t_jax.ec2t(mask).init(float16_params)`',
  "Refused at `init`: `ternary_training selects ['w'] of dtype float16; compressed leaves must "
  'be float32, bfloat16, float64 (in float16 the latent weights and their optimizer underflow '
  'and the layer silently becomes zeros): keep the params in float32 and compute in half '
  "precision with the model's dtype ...`; float16 leaves of the default full-precision "
  'optimizer likewise (before: NaN centroids, an all-zero network after one step, finite loss).',
)
def check_c27():
  params = jax.tree.map(lambda p: p.astype(jnp.float16), _params())
  with pytest.raises(ValueError, match=r"\['w'\] of dtype float16; compressed leaves must be"):
    ec2t_jax.ec2t(_mask()).init(params)
  with pytest.raises(ValueError, match=r"\['w'\] of dtype float16"):
    transforms.ternary_training().init({'w': params['w']})
  mixed = {'w': _params()['w'], 'b': params['b']}
  with pytest.raises(ValueError, match='b has dtype float16; the default full-precision optimizer'):
    ec2t_jax.ec2t(_mask()).init(mixed)
  ec2t_jax.ec2t(_mask(), fp_optimizer=optax.sgd(0.1)).init(mixed)  # The user's choice.


@case(
  'C28',
  'Library: hyperparameters as concrete arrays: `gamma=jnp.array(-1.)`, `p0_min=jnp.array(2.)`, '
  '`init_scale=jnp.array(nan)`.',
  '`ec2t_jax.ec2t(mask, gamma=jnp.array(-1.0))`',
  'Validated like numbers: `gamma must be >= 0, got -1.0`, `p0_min must be in [0, 1), got 2.0`, '
  '`init_scale must be a finite number, got nan` (tracers under `optax.inject_hyperparams` '
  'inside `jit` stay unchecked) (before: accepted).',
)
def check_c28():
  for kwargs, message in (
    (dict(gamma=jnp.array(-1.0)), 'gamma must be >= 0, got -1.0'),
    (dict(p0_min=jnp.array(2.0)), r'p0_min must be in \[0, 1\), got 2.0'),
    (dict(init_scale=jnp.array(jnp.nan)), 'init_scale must be a finite number, got nan'),
    (dict(gamma=np.float32(-2.0)), 'gamma must be >= 0, got -2.0'),
  ):
    with pytest.raises(ValueError, match=message):
      ec2t_jax.ec2t(_mask(), **kwargs)
  tx = optax.inject_hyperparams(ec2t_jax.ec2t, static_args=('ternary_mask',))(_mask(), gamma=0.2)
  params = _params()
  state = tx.init(params)
  jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)


@case(
  'C29',
  'Library: NaN gradients.',
  '`tx.update(nan_grads, state, params)`',
  'The update is skipped: zero updates, params and the whole optimizer state unchanged (the '
  'ternary transforms always; `ec2t` also for the full-precision part unless '
  '`skip_nonfinite=False`; wrap in `optax.apply_if_finite` to count them) (before: the network '
  'became all zeros with NaN latent weights forever).',
)
def check_c29():
  params = _params()
  for tx, p in (
    (ec2t_jax.ec2t(_mask()), params),
    (transforms.ternary_training(), {'w': params['w']}),
    (transforms.entropy_constrained_pruning(), {'w': params['w']}),
  ):
    state = tx.init(p)
    nan = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), p)
    updates, new_state = jax.jit(tx.update)(nan, state, p)
    assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@case(
  'C30',
  'Library: an unselected int32 leaf.',
  "`ec2t(mask).update(...)` with params holding `{'count': jnp.array(3)}`",
  'It stays 3: integer and boolean leaves get a zero update (label `non_float`) (before: the '
  'full-precision Adam changed it 3 -> 2).',
)
def check_c30():
  params = {**_params(), 'count': jnp.array(3, jnp.int32)}
  tx = ec2t_jax.ec2t({**_mask(), 'count': False})
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert int(params['count']) == 3 and params['count'].dtype == jnp.int32


@case(
  'C31',
  'Library: gamma as a bare schedule function, or as a per-layer array.',
  '`ec2t(mask, gamma=optax.linear_schedule(0, 0.3, 100))`; `gamma=jnp.array([0.1, 0.2])`',
  '`TypeError: gamma is a function (schedule); to change it during training wrap the optimizer '
  'in optax.inject_hyperparams, e.g. optax.inject_hyperparams(ec2t_jax.ec2t, '
  "static_args=('ternary_mask',))(mask, gamma=schedule)`; `gamma must be one number for every "
  'layer, got an array of shape (2,); ...` (before: `float() argument must be ... function` / a '
  'broadcasting error).',
)
def check_c31():
  schedule = optax.linear_schedule(0.0, 0.3, 100)
  with pytest.raises(TypeError, match='optax.inject_hyperparams'):
    ec2t_jax.ec2t(_mask(), gamma=schedule)
  with pytest.raises(ValueError, match=r'one number for every layer, got an array of shape \(2,\)'):
    ec2t_jax.ec2t(_mask(), gamma=jnp.array([0.1, 0.2]))
  tx = optax.inject_hyperparams(ec2t_jax.ec2t, static_args=('ternary_mask',))(
    _mask(), gamma=schedule
  )
  params = _params()
  state = tx.init(params)
  tx.update(jax.tree.map(jnp.ones_like, params), state, params)


@case(
  'C32',
  'score / export / report on a nonexistent, an empty, or a config-only workdir.',
  '`python -m ec2t_jax.scoring --workdir EMPTY` (and export, report)',
  'A one-line `error: ...` and exit 2 (`holds no config.json: is it a workdir of main.py?`, '
  '`has no summary.json: has its run finished?` from report, '
  '`has no checkpoint`).',
)
def check_c32(tmp_path, tiny_mnist, capsys):
  empty = tmp_path / 'empty'
  empty.mkdir()
  config_only = str(tmp_path / 'config_only')
  _claim(tiny_mnist(), config_only).release()
  out = str(tmp_path / 'out.x')
  for workdir, message in (
    (str(tmp_path / 'missing'), 'holds no config.json'),
    (str(empty), 'holds no config.json'),
    (config_only, 'has no checkpoint'),
  ):
    for main, argv in (
      (scoring_cli.main, []),
      (export.main, ['--out', out]),
      (report.main, ['--out', str(tmp_path / 'report')]),
    ):
      code, _, err = _cli(main, ['--workdir', workdir, *argv], capsys)
      expected = 'has no summary.json' if main is report.main else message  # Needs a summary.
      assert code == 2 and expected in err and err.startswith('error: '), err


@case(
  'C33',
  'score and export of a run stopped in the full-precision stage.',
  '`python -m ec2t_jax.scoring --workdir W` after SIGTERM at step 2 (of 3 full-precision steps)',
  'Every layer is scored as full precision, and the report says so: `checkpoint 2 is in the '
  'full-precision stage (EC2T starts at step 3): every layer is scored as full precision`; a '
  'leaf of the ternary mask counts as ternary only if its values are. export prints `note: '
  "checkpoint 2 is in the full-precision stage ...` and no overhead percentage (before: fc1's "
  '48,000 weights scored as 3,001 parameters; `+-100.00%`).',
)
def check_c33(tmp_path, tiny_mnist, signal_at, capsys):
  workdir = str(tmp_path / 'run')
  signal_at(signal.SIGTERM, 2)
  assert train.train_and_evaluate(tiny_mnist(), workdir)['preempted']
  result = scoring_cli.score_workdir(workdir)
  run = workdir_lib.load_workdir(workdir)
  dense = scoring.count(run.model, run.variables, input_shape=run.image_shape)
  assert result.totals['params'] == dense.totals['params']
  assert 'full-precision stage' in result.warnings[0]
  code, out, err = _cli(export.main, ['--workdir', workdir, '--out', str(tmp_path / 'a')], capsys)
  assert code == 0, err
  assert 'full-precision stage' in out and '-100.00%' not in out


@case(
  'C34',
  'report of two workdirs with the same basename.',
  '`python -m ec2t_jax.report --workdir a/run --workdir b/run --out R`',
  'Both runs appear, labelled `run` and `run_2`.',
)
def check_c34(tmp_path, trained_workdir, capsys):
  first = _copy(trained_workdir, tmp_path / 'a')
  second = _copy(trained_workdir, tmp_path / 'b')
  out = str(tmp_path / 'report')
  code, _, err = _cli(report.main, ['--workdir', first, '--workdir', second, '--out', out], capsys)
  assert code == 0, err
  text = open(os.path.join(out, 'report.md')).read()
  assert '## run\n' in text and '## run_2\n' in text


@case(
  'C35',
  'Unicode, spaces and `#` in the workdir path.',
  '`main.py --workdir="ünï code #1"`; score, export and report of it',
  'Everything works; report.md links its figures URL-encoded (`run%20%231_...png`), so they '
  'resolve (before: invalid Markdown links).',
)
def check_c35(tmp_path, trained_workdir, capsys):
  workdir = _copy(trained_workdir, tmp_path, 'ünï code #1')
  out = str(tmp_path / 'rep ort #2')
  assert scoring_cli.main(['--workdir', workdir]) == 0
  assert export.main(['--workdir', workdir, '--out', str(tmp_path / 'é #.ec2t')]) == 0
  assert report.main(['--workdir', workdir, '--out', out]) == 0
  capsys.readouterr()
  text = open(os.path.join(out, 'report.md')).read()
  links = re.findall(r'!\[[^\]]*\]\(([^)]*)\)', text)
  assert links
  from urllib.parse import unquote

  for link in links:
    assert ' ' not in link and '#' not in link, link
    assert os.path.exists(os.path.join(out, unquote(link))), link


@case(
  'C36',
  'Environment: JAX_ENABLE_X64, 3 devices with a batch of 64, a corrupted persistent '
  'compilation cache (read-only TFDS_DATA_DIR: the embedded MNIST reads no TFDS directory).',
  '`JAX_ENABLE_X64=1` library use; `main.py ... --config.num_devices=3`; a cache directory '
  'whose entries were overwritten with garbage',
  'float64 params train and stay ternary; `config.batch_size=32 must be divisible by the 3 '
  'devices`; a corrupted cache entry is ignored with a warning and the program compiles again '
  '(exit 0).',
  slow=True,
)
def check_c36(tmp_path, tiny_mnist):
  with jax.enable_x64(True):
    params = jax.tree.map(lambda p: p.astype(jnp.float64), _params())
    tx = ec2t_jax.ec2t(_mask())
    state = tx.init(params)
    params = ec2t_jax.ternarize(params, state)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    new = optax.apply_updates(params, updates)
    assert new['w'].dtype == jnp.float64 and len(np.unique(np.asarray(new['w']))) <= 3
  if jax.device_count() >= 3:
    with pytest.raises(ValueError, match='must be divisible by the 3 devices'):
      train.train_and_evaluate(tiny_mnist(num_devices=3), str(tmp_path / 'run'))
  cache = tmp_path / 'cache'
  code = 'import jax, jax.numpy as jnp; print(jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)))'
  env = {
    **os.environ,
    'JAX_PLATFORMS': 'cpu',
    'JAX_COMPILATION_CACHE_DIR': str(cache),
    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
  }
  first = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True)
  assert first.returncode == 0, first.stderr
  entries = [p for p in cache.iterdir() if p.is_file()]
  assert entries
  for entry in entries:
    entry.write_bytes(b'garbage')
  second = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True)
  assert second.returncode == 0, second.stderr
  assert second.stdout == first.stdout


@case(
  'C37',
  '`JAX_PLATFORMS=cuda` on a machine without a GPU.',
  '`JAX_PLATFORMS=cuda python main.py ...`',
  "One line from main.py's handler: `error: JAX cannot start a backend for "
  "JAX_PLATFORMS='cuda' (AssertionError: no backend could be initialized); install the jax "
  "plugin of that accelerator (e.g. pip install 'jax[cuda12]'), or set JAX_PLATFORMS=cpu` "
  '(before: a bare AssertionError traceback). (Simulated: `jax.devices` raises as JAX does.)',
)
def check_c37(tmp_path, tiny_mnist, monkeypatch):
  def no_backend(*args, **kwargs):
    raise AssertionError()

  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  monkeypatch.setattr(jax, 'devices', no_backend)
  with pytest.raises(ValueError, match=r"JAX_PLATFORMS='cuda' \(AssertionError: no backend"):
    train.train_and_evaluate(tiny_mnist(), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


@case(
  'C38',
  '`--config.max_to_keep=0`.',
  '`main.py ... --config.max_to_keep=0`',
  'Refused before the workdir is touched: `config.max_to_keep must be an integer >= 1 (how many '
  'checkpoints stay on disk; a stopped run resumes from the newest), got 0` (before: no '
  'checkpoint kept, a SIGTERM restart began at step 0, `export --best` IndexError).',
)
def check_c38(tmp_path, tiny_mnist):
  message = 'config.max_to_keep must be an integer >= 1.*got 0'
  _refused_untouched(tmp_path, tiny_mnist, dict(max_to_keep=0), ValueError, message)
  with pytest.raises(ValueError, match='max_to_keep must be an integer >= 1'):
    checkpoint_lib.Checkpointer(str(tmp_path / 'other'), max_to_keep=0)


@case(
  'C39',
  'A bad regular expression in `ternary_pattern`, `keep_pattern` or `prune_pattern`.',
  "`main.py ... --config.ec2t.keep_pattern='(conv'`",
  "One line before the workdir is touched: `config.ec2t.keep_pattern='(conv' is not a valid "
  'regular expression (missing ), unterminated subpattern at position 0); it is matched against '
  "leaf paths like 'conv1/kernel'` (before: a re.error traceback).",
)
def check_c39(tmp_path, tiny_mnist):
  for field in ('ternary_pattern', 'keep_pattern', 'prune_pattern', 'ternary_exclude'):
    message = rf'config.ec2t.{field}=.* is not a valid regular'
    _refused_untouched(tmp_path, tiny_mnist, {f'ec2t.{field}': '(conv'}, ValueError, message)


@case(
  'C40',
  '`--config.steps_per_epoch=-5`.',
  '`main.py ... --config.steps_per_epoch=-5`',
  '`config.steps_per_epoch must be >= 0 (0 = every batch of the training set), got -5` (before: '
  '"lower config.batch_size").',
)
def check_c40(tmp_path, tiny_mnist):
  message = r'config.steps_per_epoch must be >= 0 \(0 = every batch'
  _refused_untouched(tmp_path, tiny_mnist, dict(steps_per_epoch=-5), ValueError, message)


@case(
  'C41',
  '`--config.num_eval_examples=-1`.',
  '`main.py ... --config.num_eval_examples=-1`',
  'Refused before any step: `config.num_eval_examples must be >= 0 (0 = the whole evaluation '
  'set), got -1` (before: failed after 25 training steps).',
)
def check_c41(tmp_path, tiny_mnist):
  message = 'config.num_eval_examples must be >= 0'
  _refused_untouched(tmp_path, tiny_mnist, dict(num_eval_examples=-1), ValueError, message)


@case(
  'C42',
  '`--config.ec2t.gamma=inf`.',
  '`main.py ... --config.ec2t.gamma=inf`',
  '`config.ec2t.gamma must be a finite number, got inf` (the library too: `gamma must be a '
  'finite number, got inf`) (before: accepted, 100 % sparse, 10 % accuracy).',
)
def check_c42(tmp_path, tiny_mnist):
  message = 'config.ec2t.gamma must be a finite number, got inf'
  _refused_untouched(tmp_path, tiny_mnist, {'ec2t.gamma': float('inf')}, ValueError, message)
  with pytest.raises(ValueError, match='gamma must be a finite number, got inf'):
    ec2t_jax.ec2t(_mask(), gamma=float('inf'))


@case(
  'C43',
  'A corrupt `config.json` in the workdir, or one holding a JSON list.',
  '`echo \'{"a": \' > W/config.json` (or `[1, 2]`), then `main.py` / score / export / report',
  "One line naming the file: `the run config 'W/config.json' is not valid JSON (...)` / "
  '`... holds a JSON list, not an object; restore it, or start over with '
  '--config.overwrite=True` (before: a JSON error without the file name / an AttributeError '
  'traceback).',
)
def check_c43(tmp_path, tiny_mnist, capsys):
  for i, (content, message) in enumerate(
    (('{"a": ', 'is not valid JSON'), ('[1, 2]', 'holds a JSON list'))
  ):
    workdir = tmp_path / f'run{i}'
    workdir.mkdir()
    (workdir / 'config.json').write_text(content)
    with pytest.raises(ValueError, match=f'config.json.* {message}'):
      train.train_and_evaluate(tiny_mnist(), str(workdir))
    assert (workdir / 'config.json').read_text() == content
    code, _, err = _cli(scoring_cli.main, ['--workdir', str(workdir)], capsys)
    assert code == 2 and message in err


@case(
  'C44',
  'Rerunning the command of a finished run.',
  'the same `main.py` command again after it finished',
  'Nothing on disk changes (no file rewritten or appended: summary.json, metrics.jsonl, '
  'TensorBoard, config.json); it prints and returns the saved summary (before: wall_time_s '
  'rewritten, duplicate `final/*` metrics appended).',
)
def check_c44(tmp_path, tiny_mnist, trained_workdir, capsys):
  workdir = _copy(trained_workdir, tmp_path)
  before = _snapshot(workdir)
  again = train.train_and_evaluate(tiny_mnist(), workdir)
  assert again == _summary(trained_workdir)
  assert _snapshot(workdir) == before
  assert again['params_sha256'] in capsys.readouterr().out


# --- B: bad settings refused before training ------------------------------------------------


_BAD_SETTINGS = {
  'B01': (
    'An unknown model name.',
    '--config.model=resnet7',
    dict(model='resnet7'),
    ValueError,
    "unknown model 'resnet7'; valid names",
  ),
  'B02': (
    'An unknown dataset name.',
    '--config.dataset=mnistt',
    dict(dataset='mnistt'),
    ValueError,
    "unknown dataset 'mnistt'",
  ),
  'B03': (
    'A negative gamma.',
    '--config.ec2t.gamma=-1',
    {'ec2t.gamma': -1.0},
    ValueError,
    'gamma must be >= 0, got -1.0',
  ),
  'B04': (
    'A zero init_scale.',
    '--config.ec2t.init_scale=0',
    {'ec2t.init_scale': 0.0},
    ValueError,
    'init_scale must be > 0, got 0.0',
  ),
  'B05': (
    'A zero batch size.',
    '--config.batch_size=0',
    dict(batch_size=0),
    ValueError,
    'config.batch_size must be > 0, got 0',
  ),
  'B06': (
    'A negative full-precision learning rate.',
    '--config.fp.learning_rate=-0.1',
    {'fp.learning_rate': -0.1},
    ValueError,
    'config.fp.learning_rate must be > 0',
  ),
  'B07': (
    'A zero latent learning rate.',
    '--config.ec2t.latent_learning_rate=0',
    {'ec2t.latent_learning_rate': 0.0},
    ValueError,
    'config.ec2t.latent_learning_rate must be > 0',
  ),
  'B08': (
    'A ternary pattern that selects no layer.',
    '--config.ec2t.ternary_pattern=no_such_layer',
    {'ec2t.ternary_pattern': 'no_such_layer'},
    ValueError,
    'ternary_mask selects no parameter',
  ),
}
_BAD_ANSWERS = {
  'B01': "`unknown model 'resnet7'; valid names: ...`",
  'B02': "`unknown dataset 'mnistt'` and the valid forms",
  'B03': '`gamma must be >= 0, got -1.0`',
  'B04': '`init_scale must be > 0, got 0.0`',
  'B05': '`config.batch_size must be > 0, got 0`',
  'B06': '`config.fp.learning_rate must be > 0, got -0.1`',
  'B07': '`config.ec2t.latent_learning_rate must be > 0, got 0.0`',
  'B08': '`ternary_mask selects no parameter; params leaves are [...]`',
}


def _bad_setting_check(case_id):
  _, _, overrides, error, message = _BAD_SETTINGS[case_id]

  def check(tmp_path, tiny_mnist):
    _refused_untouched(tmp_path, tiny_mnist, overrides, error, message)

  return check


for _id, (_tried, _flag, *_rest) in _BAD_SETTINGS.items():
  case(
    _id,
    _tried,
    f'`main.py ... {_flag}`',
    f'Refused before the workdir is touched: {_BAD_ANSWERS[_id]}.',
  )(_bad_setting_check(_id))


@case(
  'B09',
  '`init_from` variables that do not fit the model.',
  '`main.py ... --config.init_from=DIR` (variables of another network)',
  "Refused before the workdir is touched: `config.init_from='DIR' does not fit the model (N "
  'problems): missing ...; unexpected ...`.',
)
def check_b09(tmp_path, tiny_mnist):
  overrides = {'init_from': _wrong_init_from(tmp_path)}
  _refused_untouched(tmp_path, tiny_mnist, overrides, ValueError, 'does not fit the model')


@case(
  'B10',
  'A TFDS dataset that was never prepared.',
  '`main.py --config=configs/cifar10.py:resnet20 --config.data_dir=EMPTY`',
  'Refused before the workdir is touched, naming the command that prepares it: `... tfds build '
  'cifar10 --file_format=array_record ...` (`DatasetNotPreparedError`).',
)
def check_b10(tmp_path, tiny_mnist):
  overrides = dict(dataset='cifar10', model='resnet20', data_dir=str(tmp_path / 'no_data'))
  _refused_untouched(
    tmp_path,
    tiny_mnist,
    overrides,
    FileNotFoundError,
    'tfds build cifar10 --file_format=array_record',
  )
  with pytest.raises(datasets.DatasetNotPreparedError, match='tfds build cifar100'):
    datasets.get_data_source('cifar100', 'train', data_dir=str(tmp_path))


@case(
  'B11',
  'A workdir that cannot be created.',
  '`main.py --workdir=FILE/sub`',
  "`workdir 'FILE/sub' cannot be created: Not a directory`.",
)
def check_b11(tmp_path, tiny_mnist):
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  with pytest.raises(ValueError, match='cannot be created'):
    train.train_and_evaluate(tiny_mnist(), str(blocker / 'sub'))


@case(
  'B12',
  'A workdir that holds a run of another config.',
  '`main.py ... --workdir=W` where W ran with gamma 0.5',
  'Refused, config.json unchanged: `workdir W holds a run of a different config (ec2t.gamma: '
  '0.5 -> 0.15); use another --workdir, or --config.overwrite=True to start over there (the old '
  'run is moved aside)`.',
)
def check_b12(tmp_path, tiny_mnist):
  workdir = str(tmp_path / 'work')
  _claim(tiny_mnist(**{'ec2t.gamma': 0.5}), workdir).release()
  before = open(os.path.join(workdir, 'config.json')).read()
  with pytest.raises(ValueError, match=r'different config \(ec2t.gamma: 0.5 -> 0.15\)'):
    train.train_and_evaluate(tiny_mnist(), workdir)
  assert open(os.path.join(workdir, 'config.json')).read() == before


@case(
  'B13',
  'The processes and restarts of one run differ only in resumable fields.',
  '`main.py ... --config.process_id=1 --config.coordinator_address=...` on a claimed W',
  'Accepted (process_id, coordinator_address, ... may differ); a different num_processes is '
  'another run and is refused, and so is another worker_count (see R02).',
)
def check_b13(tmp_path, tiny_mnist):
  workdir = str(tmp_path / 'work')
  first = {'process_id': 0, 'coordinator_address': '127.0.0.1:1234', 'worker_count': 0}
  _claim(tiny_mnist(distributed=True, num_processes=2, **first), workdir).release()
  other = {'process_id': 1, 'coordinator_address': '127.0.0.1:5678', 'worker_count': 0}
  _claim(tiny_mnist(distributed=True, num_processes=2, **other), workdir).release()
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['coordinator_address'] == '127.0.0.1:5678'
  assert not os.path.exists(os.path.join(workdir, 'config.json.tmp'))
  with pytest.raises(ValueError, match='num_processes: 2 -> 1'):
    _claim(tiny_mnist(distributed=True, num_processes=1, **other), workdir)


@case(
  'B14',
  'Checkpoints in the workdir that cannot be restored into this train state.',
  '`main.py` on a W whose checkpoints another program wrote',
  'Refused, the checkpoints kept: `workdir W holds checkpoints (steps [2]) but none can be '
  'restored into this train state ...; use another --workdir, or --config.overwrite=True to '
  'start over there (the old run is moved aside)`.',
)
def check_b14(tmp_path, tiny_mnist):
  workdir = str(tmp_path / 'work')
  _claim(tiny_mnist(), workdir).release()
  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=2)
  ckpt.save(2, {'w': jnp.ones(3)}, {'phase': 'ec2t'})
  ckpt.close()
  with pytest.raises(ValueError, match=r'holds checkpoints \(steps \[2\]\) but none can be'):
    train.train_and_evaluate(tiny_mnist(), workdir)
  assert checkpoint_lib.Checkpointer(workdir, max_to_keep=2).steps() == [2]


@case(
  'B15',
  'Checkpoints or a summary without a config.json (it was deleted).',
  '`rm W/config.json; main.py ...`',
  'Refused: `workdir W holds checkpoints, best, summary.json but no config.json, so the settings '
  'that wrote them are unknown; restore config.json, or start over with --config.overwrite=True '
  '(the old files are moved aside)`; with overwrite they are moved aside.',
)
def check_b15(tmp_path, tiny_mnist, trained_workdir):
  workdir = _copy(trained_workdir, tmp_path)
  os.remove(os.path.join(workdir, 'config.json'))
  with pytest.raises(ValueError, match='but no config.json'):
    _claim(tiny_mnist(), workdir)
  _claim(tiny_mnist(overwrite=True), workdir).release()
  assert sorted(n for n in os.listdir(workdir) if not n.startswith('overwritten-')) == [
    'config.json'
  ]


@case(
  'B16',
  'A misspelled or invalid flag on the command line.',
  '`main.py ... --config.ec2t.gama=0.1`; `--config.model=resnet7`',
  'Exit status non-zero, one line (`error: bad flag: ... gama ...`, `error: unknown model '
  "'resnet7'; ...`), no traceback, no workdir created.",
  slow=True,
)
def check_b16(tmp_path, repo_root):
  for flag, message in (
    ('--config.ec2t.gama=0.1', 'gama'),
    ('--config.model=resnet7', "error: unknown model 'resnet7'"),
  ):
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


# --- the table and its tests -------------------------------------------------------------------


def _cell(text: str) -> str:
  return ' '.join(text.split()).replace('|', '\\|')


def render_table() -> str:
  """The Markdown table of `CASES` (what docs/reliability.md holds between its markers)."""
  lines = [
    '| id | what was tried | command | what the program answers now | test |',
    '|---|---|---|---|---|',
  ]
  for c in CASES:
    test = f'`test_case[{c.id}]`' + (' (slow)' if c.slow else '')
    lines.append(f'| {c.id} | {_cell(c.tried)} | {_cell(c.command)} | {_cell(c.answer)} | {test} |')
  return '\n'.join(lines)


def _doc_table(text: str) -> str:
  start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
  return text[start:end].strip()


# The rows of the other modules (imported for their `@case` registrations).
import reliability_cases_input  # noqa: E402, F401
import reliability_cases_resume  # noqa: E402, F401


@pytest.mark.parametrize(
  'case_id', [pytest.param(c.id, marks=[pytest.mark.slow] if c.slow else []) for c in CASES]
)
def test_case(case_id, request):
  """Runs the check of one row of the table (its fixtures by parameter name)."""
  check = CHECKS[case_id]
  kwargs = {name: request.getfixturevalue(name) for name in inspect.signature(check).parameters}
  check(**kwargs)


def test_table_is_current():
  """docs/reliability.md holds exactly the rows of CASES: each row a test, each test a row."""
  with open(DOC, encoding='utf-8') as f:
    doc = _doc_table(f.read())
  ids = re.findall(r'^\| ([A-Z]\d\d) \|', doc, flags=re.MULTILINE)
  assert sorted(ids) == sorted(CHECKS), 'rows without a test, or tests without a row'
  assert len(ids) == len(set(ids))
  assert doc == render_table(), 'docs/reliability.md is stale: run tests/reliability_cases_test.py'
  assert [c.id for c in CASES if c.id.startswith('C')] == [f'C{i:02d}' for i in range(1, 45)]


def _write_table() -> None:
  with open(DOC, encoding='utf-8') as f:
    text = f.read()
  start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
  with open(DOC, 'w', encoding='utf-8') as f:
    f.write(text[:start] + '\n' + render_table() + '\n' + text[end:])
  print(f'wrote {len(CASES)} rows to {DOC}')


if __name__ == '__main__':
  _write_table()


# --- the workdir lock in detail ----------------------------------------------------------------


def _claim(config, workdir):
  """`workdir_lib.claim_workdir` of a config, as the trainer calls it (after parsing)."""
  return workdir_lib.claim_workdir(parse_lib.parse(config, check_data=False), workdir)


def _plant_lock(workdir, **holder):
  """A lock file as a process that ended without releasing it leaves it."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, workdir_lib.LOCK_FILE)
  with open(path, 'w') as f:
    json.dump(holder, f)
  return path


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
  dead = subprocess.run(
    [sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True
  )
  pid = int(dead.stdout)
  _plant_lock(str(tmp_path), pid=pid, host=socket.gethostname(), started='yesterday')
  with caplog.at_level('WARNING'):
    lock = workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  assert f'taking over the lock of pid {pid}' in caplog.text and 'no longer runs' in caplog.text
  assert workdir_lib.WorkdirLock.read_holder(lock.path)['pid'] == os.getpid()
  lock.release()
  assert not os.path.exists(lock.path)


def test_lock_of_a_live_process_elsewhere_is_refused_until_stale(tmp_path, monkeypatch):
  path = _plant_lock(str(tmp_path), pid=1, host='another-host', started='now', command='main.py')
  with pytest.raises(workdir_lib.WorkdirBusyError, match=r"pid 1 on host 'another-host'.*delete"):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  old = os.stat(path).st_mtime - lock_lib.STALE_LOCK_SECONDS - 1
  os.utime(path, (old, old))  # Its holder stopped refreshing it long ago.
  workdir_lib.WorkdirLock(str(tmp_path)).acquire().release()


def test_lock_file_of_a_live_process_here_is_refused_without_flock(tmp_path):
  """Where flock is not enforced (some network filesystems), the file alone refuses."""
  _plant_lock(str(tmp_path), pid=os.getpid(), host=socket.gethostname(), started='now')
  with pytest.raises(workdir_lib.WorkdirBusyError, match=_busy_message()):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()


def test_lock_heartbeat_refreshes_the_file(tmp_path, monkeypatch):
  monkeypatch.setattr(lock_lib, 'HEARTBEAT_SECONDS', 0.05)
  lock = workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  try:
    os.utime(lock.path, (0, 0))
    deadline = time.time() + 10
    while os.stat(lock.path).st_mtime == 0 and time.time() < deadline:
      time.sleep(0.05)
    assert os.stat(lock.path).st_mtime > 0
  finally:
    lock.release()


def test_other_processes_of_one_run_take_no_lock(tmp_path, tiny_mnist, monkeypatch):
  """Process 0 holds the lock; process 1 of the same run claims the workdir alongside it."""
  workdir = str(tmp_path / 'run')
  held = _claim(tiny_mnist(), workdir)  # Process 0.
  try:
    monkeypatch.setattr(jax, 'process_index', lambda: 1)
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    monkeypatch.setattr(workdir_lib.multihost_utils, 'process_allgather', lambda x: np.zeros(2))
    monkeypatch.setattr(workdir_lib.multihost_utils, 'sync_global_devices', lambda name: None)
    assert _claim(tiny_mnist(), workdir) is None
    monkeypatch.setattr(workdir_lib.multihost_utils, 'process_allgather', lambda x: np.ones(2))
    with pytest.raises(ValueError, match='another process of this run could not claim'):
      _claim(tiny_mnist(), workdir)
  finally:
    held.release()


def test_lock_is_released_when_the_run_fails(tmp_path, tiny_mnist, monkeypatch):
  workdir = str(tmp_path / 'run')

  def broken(*args):
    raise RuntimeError('data pipeline died')

  monkeypatch.setattr(train, 'to_global', broken)
  with pytest.raises(RuntimeError, match='data pipeline died'):
    train.train_and_evaluate(tiny_mnist(), workdir)
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))


# --- Ctrl-C in detail (C11 is the table's row) ---------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize('stop_at', [2, 3, 7])  # inside FP, at the FP/EC2T boundary, frozen
def test_ctrl_c_saves_and_resume_matches_uninterrupted(
  tmp_path, stop_at, trained_workdir, tiny_mnist, signal_at
):
  uninterrupted = _summary(trained_workdir)
  workdir = str(tmp_path / 'run')
  signal_at(signal.SIGINT, stop_at)
  assert train.train_and_evaluate(tiny_mnist(), workdir) == {'preempted': True, 'step': stop_at}
  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=2)
  assert ckpt.steps()[-1] == stop_at
  ckpt.close()
  resumed = train.train_and_evaluate(tiny_mnist(), workdir)
  assert resumed['params_sha256'] == uninterrupted['params_sha256']
  assert resumed['test_accuracy'] == uninterrupted['test_accuracy']


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once_and_loses_nothing_saved(
  tmp_path, trained_workdir, tiny_mnist, signal_at, monkeypatch
):
  uninterrupted = _summary(trained_workdir)
  workdir = str(tmp_path / 'run')
  signal_at(signal.SIGINT, 5)  # The first Ctrl-C: the loop saves checkpoint 5 ...
  original = ocp.JsonCheckpointHandler.async_save

  def second_ctrl_c(self, directory, *args, **kwargs):  # ... and the second comes meanwhile.
    if '/checkpoints/5' in str(directory):
      os.kill(os.getpid(), signal.SIGINT)
    return original(self, directory, *args, **kwargs)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, 'async_save', second_ctrl_c)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(tiny_mnist(), workdir)
  monkeypatch.setattr(ocp.JsonCheckpointHandler, 'async_save', original)
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))
  resumed = train.train_and_evaluate(tiny_mnist(), workdir)
  assert resumed['params_sha256'] == uninterrupted['params_sha256']
