"""The command-line tools (export, scoring, report): a model that does not build, progress lines."""

import json
import os
import shutil
import sys

import jax
import pytest

from ec2t_jax import export, report
from ec2t_jax.scoring import __main__ as scoring_cli
from ec2t_jax.training import workdir as workdir_lib


def _with_model(trained_workdir, tmp_path, model):
  """A copy of the trained run whose config.json names `model` (all its checkpoints intact)."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained_workdir, workdir)
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    config = json.load(f)
  config['model'] = model
  with open(path, 'w') as f:
    json.dump(config, f)
  return workdir


@pytest.mark.parametrize(
  'model, message, hint',
  [
    # A model of the user's own module that is not on PYTHONPATH here.
    ('my_user_nets:Net', "cannot import 'my_user_nets'", 'PYTHONPATH'),
    # A name the user's code registered (models.register) in training, not registered here.
    ('my_registered_net', "unknown model 'my_registered_net'", 'ec2t_jax.models.register'),
  ],
)
def test_a_model_that_does_not_build_is_one_error_not_one_per_checkpoint(
  trained_workdir, tmp_path, capsys, model, message, hint
):
  workdir = _with_model(trained_workdir, tmp_path, model)
  assert len(os.listdir(os.path.join(workdir, 'checkpoints'))) > 1  # Several to fall back on.
  with pytest.raises(ValueError) as info:
    workdir_lib.load_workdir(workdir)
  text = str(info.value)
  assert message in text and text.count(hint) == 1 and '\n' not in text, text
  assert 'reads back' not in text, text  # No checkpoint is to blame, nor tried.
  for main, argv in (
    (export.main, ['--out', str(tmp_path / 'x.ec2t')]),
    (scoring_cli.main, []),
    (report.main, ['--out', str(tmp_path / 'report')]),
  ):
    assert main(['--workdir', workdir, *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith('error: ') and captured.err.count('\n') == 1, captured.err
    assert captured.err.count(hint) == 1 and message in captured.err, captured.err
    assert not captured.out


def test_progress_lines_go_to_a_terminal_only(trained_workdir, tmp_path, capsys, monkeypatch):
  step = max(int(s) for s in os.listdir(os.path.join(trained_workdir, 'checkpoints')))
  tools = (
    (export.main, ['--out', str(tmp_path / 'x.ec2t')], 'export'),
    (scoring_cli.main, [], 'scoring'),
    (report.main, ['--out', str(tmp_path / 'report')], 'report'),
  )
  for main, argv, _ in tools:  # Captured (no terminal): results on stdout, nothing else.
    assert main(['--workdir', trained_workdir, *argv]) == 0
    assert capsys.readouterr().err == ''
  monkeypatch.setattr(sys.stderr, 'isatty', lambda: True)
  for main, argv, tool in tools:
    assert main(['--workdir', trained_workdir, *argv]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines[0] == f'{tool}: reading checkpoint {step} of {trained_workdir}', lines
    assert all(line.startswith(f'{tool}: ') for line in lines), lines
    assert f'{tool}: ' not in captured.out
  # The tools leave a compilation cache chosen already (here conftest's) as it is.
  assert jax.config.jax_compilation_cache_dir == os.environ['JAX_COMPILATION_CACHE_DIR']
