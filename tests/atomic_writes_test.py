"""Files the project replaces are replaced whole: a failed write leaves the old file intact.

Each writer (export, ONNX, summary/config JSON, report.md and its figures, sweep.md, the
scoring JSON) runs once under a write that fails at the end (as `ulimit -f` or a full
disk make it fail) over an existing file, which must come out byte for byte as it was.
"""

import errno
import os

import pytest

from ec2t_jax import files
from ec2t_jax.training import lock as lock_lib
from ec2t_jax.training import workdir as workdir_lib

OLD = b'the previous good file\n'


@pytest.fixture
def failing_writes(monkeypatch):
  """Makes every `files.replacing` write fail with EFBIG after the data was written."""

  def fsync(fd):
    raise OSError(errno.EFBIG, 'File too large')

  monkeypatch.setattr(files.os, 'fsync', fsync)


def _old_file(path) -> str:
  with open(path, 'wb') as f:
    f.write(OLD)
  return str(path)


def _intact(path) -> None:
  with open(path, 'rb') as f:
    assert f.read() == OLD
  leftovers = [n for n in os.listdir(os.path.dirname(path)) if n.endswith('.tmp')]
  assert not leftovers, leftovers


def test_replace_file_replaces_and_leaves_no_temporary(tmp_path):
  path = tmp_path / 'a.json'
  files.replace_file(path, '{"x": 1}')
  files.replace_file(path, b'{"x": 2}')
  assert path.read_bytes() == b'{"x": 2}'
  assert os.listdir(tmp_path) == ['a.json']


def test_a_failed_write_leaves_the_old_file(tmp_path, failing_writes):
  path = _old_file(tmp_path / 'a.bin')
  with pytest.raises(OSError, match='File too large'):
    files.replace_file(path, b'x' * 100_000)
  _intact(path)


def test_a_symlink_is_replaced_not_written_through(tmp_path):
  victim = _old_file(tmp_path / 'victim.txt')
  link = tmp_path / 'summary.json'
  link.symlink_to(victim)
  workdir_lib.write_json(str(link), {'a': 1})
  assert not link.is_symlink() and link.read_text() == '{\n "a": 1\n}'
  _intact(victim)


def test_the_lock_never_follows_a_symlink(tmp_path):
  victim = _old_file(tmp_path / 'victim.txt')
  workdir = tmp_path / 'w'
  workdir.mkdir()
  (workdir / lock_lib.LOCK_FILE).symlink_to(victim)
  with pytest.raises(ValueError, match=r'lock .* is a symlink .*victim.txt.*delete it'):
    lock_lib.WorkdirLock(str(workdir)).acquire()
  _intact(victim)


def test_every_writer_leaves_the_old_file_under_a_failing_write(
  tmp_path, trained_workdir, failing_writes
):
  from ec2t_jax import export, report
  from ec2t_jax.report import sweep_report

  run = workdir_lib.load_workdir(trained_workdir)

  path = _old_file(tmp_path / 'model.ec2t')
  with pytest.raises(OSError):
    export.save(path, run.variables, run.opt_state)
  _intact(path)

  path = _old_file(tmp_path / 'summary.json')
  with pytest.raises(OSError):
    workdir_lib.write_json(path, {'test_accuracy': 0.5})
  _intact(path)

  out = tmp_path / 'report'
  out.mkdir()
  md = _old_file(out / 'report.md')
  with pytest.raises(OSError):
    report.write_report([trained_workdir], str(out))
  _intact(md)

  out = tmp_path / 'sweep'
  out.mkdir()
  md = _old_file(out / 'sweep.md')
  with pytest.raises(OSError):
    sweep_report.write_sweep_report([(0.15, 0.6, trained_workdir)], str(out))
  _intact(md)


def test_onnx_and_scoring_json_leave_the_old_file(tmp_path, trained_workdir, failing_writes):
  pytest.importorskip('onnx')
  from ec2t_jax import onnx_export
  from ec2t_jax.scoring import __main__ as scoring_main

  run = workdir_lib.load_workdir(trained_workdir)
  proto = onnx_export.to_onnx(run.model, run.variables, run.image_shape)
  path = _old_file(tmp_path / 'model.onnx')
  with pytest.raises(OSError):
    onnx_export.save(path, proto)
  _intact(path)

  path = _old_file(tmp_path / 'costs.json')
  with pytest.raises(OSError):
    scoring_main.main(['--workdir', trained_workdir, '--json', path])
  _intact(path)
