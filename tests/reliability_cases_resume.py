"""Rows of the reliability table: resumes that would mix runs (R), clear errors (E), files (A).

Each `@case` registers one row of docs/reliability.md (see
`tests/reliability_cases_test.py`, which runs them as `test_case[ID]`).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reliability_registry import case

import ec2t_jax
from ec2t_jax import export, files, models
from ec2t_jax.training import checkpoint as checkpoint_lib
from ec2t_jax.training import datasets
from ec2t_jax.training import parse as parse_lib
from ec2t_jax.training import workdir as workdir_lib

# --- helpers ---------------------------------------------------------------------------------


def _claim(config, workdir):
  """Claims `workdir` for `config` as the trainer does (after parsing), and releases it."""
  lock = workdir_lib.claim_workdir(parse_lib.parse(config), workdir)
  if lock is not None:
    lock.release()


def _mnist_like_npz(path, seed):
  """An npz of 28x28 grey images with labels 0..2 (data of `seed`)."""
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, size=(48, 28, 28), dtype=np.uint8)
  y = np.arange(48) % 3
  np.savez(path, x_train=x, y_train=y, x_test=x[:16], y_test=y[:16])
  return f'npz:{path}'


def _save_steps(ckpt, steps):
  for step in steps:
    ckpt.save(step, {'w': jnp.full(3, float(step))}, {'phase': 'fp'})


# --- R: resumes that would mix two runs ----------------------------------------------------------


@case(
  'R01',
  'A run on `npz:data.npz` stopped by SIGTERM; the file rewritten with other data (same classes '
  'and sizes); the same command again.',
  '`T TINY --config.dataset=npz:data.npz`, SIGTERM, rewrite data.npz, rerun',
  "Refused before any step: `workdir W holds a run trained on other data than 'npz:...' is now "
  "(sha256: 'ab12…' -> '9f3c…'); restore the data it was trained on, use another --workdir, or "
  '--config.overwrite=True ...` (before: resumed on the new data with the old iterator position, '
  'summary.json mixing both). W/data.json records the fingerprint (`datasets.fingerprint`: '
  'sizes, classes, shape, a sha256 of in-memory arrays, the tfds name and version).',
)
def check_r01(tmp_path, tiny_mnist):
  path = tmp_path / 'data.npz'
  config = tiny_mnist(dataset=_mnist_like_npz(path, seed=0))
  workdir = str(tmp_path / 'run')
  _claim(config, workdir)
  with open(os.path.join(workdir, workdir_lib.DATA_FILE)) as f:
    recorded = json.load(f)
  assert recorded['split_sizes'] == {'test': 16, 'train': 48} and len(recorded['sha256']) == 64
  _claim(config, workdir)  # The same data resumes.
  _mnist_like_npz(path, seed=1)
  with pytest.raises(ValueError, match=r"trained on other data than 'npz:.*' is now \(sha256: '"):
    _claim(config, workdir)
  _claim(tiny_mnist(dataset=f'npz:{path}', overwrite=True), workdir)  # Starting over is allowed.
  tfds_spec = datasets.DatasetSpec('tfds:x', 'x', 2, (4, 4, 1), {'train': 8}, 'test', 0)
  assert datasets.fingerprint(tfds_spec) == {
    'dataset': 'tfds:x',
    'num_classes': 2,
    'image_shape': [4, 4, 1],
    'split_sizes': {'train': 8},
    'tfds': 'x',
  }
  newer = dataclasses.replace(tfds_spec, version='3.0.1')
  assert datasets.fingerprint(newer)['version'] == '3.0.1'  # A re-prepared version differs.


@case(
  'R02',
  'Resuming a `worker_count=0` run with `--config.worker_count=2` (it was documented as a '
  'resumable change).',
  '`T TINY`, SIGTERM, rerun with `--config.worker_count=2`',
  'Refused in one line before any step: `workdir W holds a run of a different config '
  '(worker_count: 0 -> 2); use another --workdir, or --config.overwrite=True ...`; worker_count '
  "is no longer listed as resumable (before: `KeyError: 'worker_count'` from grain's "
  '`set_state`).',
)
def check_r02(tmp_path, tiny_mnist):
  workdir = str(tmp_path / 'run')
  _claim(tiny_mnist(worker_count=0), workdir)
  assert 'worker_count' not in workdir_lib.RESUMABLE_FIELDS
  with pytest.raises(ValueError, match=r'different config \(worker_count: 0 -> 2\)'):
    _claim(tiny_mnist(worker_count=2), workdir)


@case(
  'R03',
  'An empty `checkpoints/1000` directory (a stranger) in a run keeping `max_to_keep=2`.',
  '`mkdir W/checkpoints/1000`, then the run saves checkpoints 2, 4, 6',
  'The stranger is not counted, restored or deleted, and a warning names it (`W/checkpoints/1000 '
  'is not a complete checkpoint ...; it is ignored, never deleted`); the newest two real '
  'checkpoints stay (before: it counted toward max_to_keep and the real checkpoint was rotated '
  'away).',
)
def check_r03(tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  os.makedirs(os.path.join(workdir, 'checkpoints', '1000'))
  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=2)
  with caplog.at_level(logging.WARNING):
    _save_steps(ckpt, (2, 4, 6))
  assert ckpt.steps() == [4, 6]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1000', '4', '6']
  assert 'checkpoints/1000 is not a complete checkpoint' in caplog.text
  target = {'w': jnp.zeros(3)}
  step, state, _ = ckpt.restore_latest(lambda s: target)
  assert step == 6 and float(state['w'][0]) == 6.0
  ckpt.close()


@case(
  'R04',
  'An old checkpoint that cannot be deleted (an immutable file) when the run rotates it away.',
  '`chattr +i W/checkpoints/2/...`; the run saves checkpoint 6 with `max_to_keep=2`',
  'Checkpoint 6 is reported written and the run goes on, with a warning naming what failed: '
  '`checkpoint 6 was written, but removing the old checkpoint W/checkpoints/2 failed '
  '(PermissionError: ...); remove it by hand` (before: `checkpoint 6 could not be written`, the '
  'run stopped). (Simulated: the deletion is patched to fail.)',
)
def check_r04(tmp_path, caplog, monkeypatch):
  workdir = str(tmp_path / 'run')
  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=2)
  _save_steps(ckpt, (2, 4))
  original = ckpt._manager.delete

  def delete(step):
    if step == 2:
      raise PermissionError(errno.EPERM, 'Operation not permitted', f'checkpoints/{step}/x')
    original(step)

  monkeypatch.setattr(ckpt._manager, 'delete', delete)
  with caplog.at_level(logging.WARNING):
    _save_steps(ckpt, (6,))  # No OSError: checkpoint 6 is on disk.
  assert ckpt.steps() == [2, 4, 6]
  assert 'checkpoint 6 was written, but removing the old checkpoint' in caplog.text
  assert 'checkpoints/2 failed (PermissionError' in caplog.text
  ckpt.close()


@case(
  'R05',
  'A `folder:` dataset whose images were replaced by others of the same names and sizes between '
  'SIGTERM and the rerun (ours: the folder twin of R01).',
  '`T TINY --config.dataset=folder:DIR`, SIGTERM, replace DIR/a/0.png, rerun',
  'Refused like R01: the fingerprint hashes the decoded images the pipeline reads, so one '
  'changed pixel is another dataset.',
)
def check_r05(tmp_path, tiny_mnist):
  import PIL.Image

  root = tmp_path / 'images'
  rng = np.random.default_rng(0)
  for c in ('a', 'b', 'c'):
    (root / c).mkdir(parents=True)
    for i in range(5):
      PIL.Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(
        root / c / f'{i}.png'
      )
  config = tiny_mnist(dataset=f'folder:{root}', batch_size=8, eval_batch_size=8)
  workdir = str(tmp_path / 'run')
  _claim(config, workdir)
  pixels = np.asarray(PIL.Image.open(root / 'a' / '0.png')).copy()
  pixels[0, 0] ^= 1
  PIL.Image.fromarray(pixels).save(root / 'a' / '0.png')
  with pytest.raises(ValueError, match='trained on other data'):
    _claim(config, workdir)


# --- E: clear errors for the rest ---------------------------------------------------------------


@case(
  'E01',
  'Library: an empty `(0, 4)` kernel selected by the mask.',
  "`ec2t_jax.ec2t({'w': True}).init({'w': jnp.zeros((0, 4))})`",
  "`ternary_training selects ['w'] of shape (0, 4), which has no values to compress; leave "
  'empty leaves out of the mask` (before: `zero-size array to reduction operation max`).',
)
def check_e01():
  with pytest.raises(ValueError, match=r"selects \['w'\] of shape \(0, 4\), which has no values"):
    ec2t_jax.ec2t({'w': True}).init({'w': jnp.zeros((0, 4))})


@case(
  'E02',
  'Library: int32 gradients for float params.',
  '`tx.update({"w": jnp.ones((4, 6), jnp.int32), ...}, state, params)`',
  '`the gradient of w has dtype int32 but the param is float32: gradients of float params must '
  'be floating point ...` (before: `invalid EC2T masks: w has dtype int32`, blaming the params).',
)
def check_e02():
  params = {'w': jnp.linspace(-1.0, 1.0, 24).reshape(4, 6), 'b': jnp.zeros(6)}
  tx = ec2t_jax.ec2t({'w': True, 'b': False})
  state = tx.init(params)
  grads = {'w': jnp.ones((4, 6), jnp.int32), 'b': jnp.zeros(6)}
  with pytest.raises(ValueError, match='the gradient of w has dtype int32 but the param is float'):
    tx.update(grads, state, params)


@case(
  'E03',
  'Library: an element-wise bool mask (one bool per weight), and a mask of another structure.',
  "`ec2t_jax.ec2t({'w': np.ones((4, 6), bool), 'b': False}).init(params)`",
  "`the mask leaf ['w'] is an array of shape (4, 6); a mask holds one bool per params leaf (True "
  'selects the whole leaf), not one per element`; another structure names the leaves: `leaves '
  'only in the mask: ["[\'x\']"]; only in the params: ["[\'w\']"]` (before: two identical '
  'PyTreeDefs).',
)
def check_e03():
  params = {'w': jnp.linspace(-1.0, 1.0, 24).reshape(4, 6), 'b': jnp.zeros(6)}
  with pytest.raises(ValueError, match=r"mask leaf \['w'\] is an array of shape \(4, 6\)"):
    ec2t_jax.ec2t({'w': np.ones((4, 6), bool), 'b': False}).init(params)
  with pytest.raises(ValueError, match=r"only in the mask: \[\"\['x'\]\"\]; only in the params"):
    ec2t_jax.ec2t({'x': True, 'b': False}).init(params)


@case(
  'E04',
  '`load_predictor` on a batch of 0 images.',
  '`export.load_predictor(path)(np.zeros((0, 28, 28), np.uint8))`',
  'Logits of shape `(0, 10)` (before: `ZeroDivisionError`).',
)
def check_e04(tmp_path):
  model = models.create('lenet5', num_classes=10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  path = str(tmp_path / 'lenet5.ec2t')
  info = {'name': 'lenet5', 'num_classes': 10, 'input_shape': [28, 28, 1]}
  export.save(path, jax.device_get(variables), model=info)
  logits = export.load_predictor(path)(np.zeros((0, 28, 28), np.uint8))
  assert logits.shape == (0, 10) and logits.dtype == jnp.float32


@case(
  'E05',
  'A lock file holding `"abc"`, `[5]`, `null`, pid 0, a pid as a string, or no host (no live '
  'process holds its flock).',
  '`echo \'"abc"\' > W/lock` (or `[5]`, `{"pid": 0, "host": H}`, `{"pid": "12"}`); '
  '`main.py ... --workdir=W`',
  'Taken over with a warning naming the content: `taking over the lock file, which names no '
  "process (it holds '[5]', not a record with a positive integer pid and a host)` (before: bare "
  '`int()` errors, and pid 0 was never taken over). A live holder (its flock) is still refused.',
)
def check_e05(tmp_path, caplog):
  host = json.dumps(os.uname().nodename)
  for i, content in enumerate(
    ('"abc"', '[5]', 'null', f'{{"pid": 0, "host": {host}}}', '{"pid": "12"}', '{"pid": 7}')
  ):
    workdir = tmp_path / f'w{i}'
    workdir.mkdir()
    (workdir / workdir_lib.LOCK_FILE).write_text(content)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      lock = workdir_lib.WorkdirLock(str(workdir)).acquire()
    assert 'names no process' in caplog.text and content[:3] in caplog.text
    assert workdir_lib.WorkdirLock.read_holder(lock.path)['pid'] == os.getpid()
    with pytest.raises(workdir_lib.WorkdirBusyError):  # The holder's flock still counts.
      workdir_lib.WorkdirLock(str(workdir)).acquire()
    lock.release()


@case(
  'E06',
  'The workdir is a dangling symlink.',
  '`ln -s /missing/dir W; main.py ... --workdir=W`',
  "`workdir W is a symlink to '/missing/dir', which does not exist; create that directory, or "
  'pass another --workdir` (before: `File exists`).',
)
def check_e06(tmp_path, tiny_mnist):
  link = tmp_path / 'W'
  link.symlink_to(tmp_path / 'missing' / 'dir')
  with pytest.raises(ValueError, match=r"is a symlink to '.*missing/dir', which does not exist"):
    _claim(tiny_mnist(), str(link))


@case(
  'E07',
  'A dataset whose training labels are all one class.',
  '`np.savez(..., y_train=np.zeros(N))`; `main.py ... --config.dataset=npz:...`',
  'A warning: `dataset npz:...: every training label is 0, so any network scores 100 % on it; a '
  "classifier needs at least two classes` (before: trained to '100 %' with no warning).",
)
def check_e07(tmp_path, caplog):
  x = np.zeros((8, 4, 4), np.uint8)
  path = tmp_path / 'one.npz'
  np.savez(path, x_train=x, y_train=np.zeros(8, np.int64), x_test=x, y_test=np.zeros(8, np.int64))
  with caplog.at_level(logging.WARNING):
    spec = datasets.get_spec(f'npz:{path}')
  assert spec.num_classes == 1
  assert 'every training label is 0, so any network scores 100 %' in caplog.text


@case(
  'E08',
  'A lock file that is a directory, or a FIFO (ours).',
  '`mkdir W/lock; main.py ... --workdir=W`',
  "One line: `workdir lock 'W/lock' is not a regular file; delete it and rerun` (no hang on the "
  'FIFO, no IsADirectoryError traceback).',
)
def check_e08(tmp_path):
  for i, make in enumerate((os.mkdir, os.mkfifo)):
    workdir = tmp_path / f'w{i}'
    workdir.mkdir()
    make(str(workdir / workdir_lib.LOCK_FILE))
    with pytest.raises(ValueError, match="lock '.*' is (not a regular file|a directory)"):
      workdir_lib.WorkdirLock(str(workdir)).acquire()


# --- A: files replaced whole ---------------------------------------------------------------------


@case(
  'A01',
  'Every file the program or a tool replaces (config.json, summary.json, sweep.json, sweep.md, '
  'report.md and figures, .ec2t and .onnx exports, the scoring JSON) written under a failing '
  'write (full disk, `ulimit -f`).',
  'each writer with `fsync` patched to fail with EFBIG over an existing file',
  'The write fails with its `OSError`; the old file is byte for byte as it was and no temporary '
  'file is left (every writer: `tests/atomic_writes_test.py`).',
)
def check_a01(tmp_path, monkeypatch):
  old = b'{"the": "previous good file"}'
  path = tmp_path / 'summary.json'
  path.write_bytes(old)

  def fsync(fd):
    raise OSError(errno.EFBIG, 'File too large')

  monkeypatch.setattr(files.os, 'fsync', fsync)
  with pytest.raises(OSError, match='File too large'):
    workdir_lib.write_json(str(path), {'new': 1})
  assert path.read_bytes() == old
  assert os.listdir(tmp_path) == ['summary.json']


@case(
  'A02',
  'A symlink planted at `W/summary.json` pointing at a file outside the workdir (ours).',
  '`ln -s ~/.bashrc W/summary.json`; the run writes its summary',
  'The link is replaced by the new file; its target is untouched.',
)
def check_a02(tmp_path):
  victim = tmp_path / 'victim.txt'
  victim.write_text('keep me')
  link = tmp_path / 'summary.json'
  link.symlink_to(victim)
  workdir_lib.write_json(str(link), {'accuracy': 0.9})
  assert not link.is_symlink() and json.loads(link.read_text()) == {'accuracy': 0.9}
  assert victim.read_text() == 'keep me'
