"""Tests of `ec2t_jax.sweep`: the configs of a sweep (both config forms) and a tiny sweep."""

import json
import logging
import os
import sys

import ml_collections
import pytest
from conftest import TINY_OVERRIDES

from ec2t_jax import sweep
from ec2t_jax.training import parse as parse_lib
from ec2t_jax.training import workdir as workdir_lib


def _default_config():
  from ec2t_jax.configs import mnist

  config = mnist.get_config()
  config.lock()  # As the --config flag gives it.
  return config


def _explicit_config(order='pre,warm,ternarize,freeze,prune'):
  config = _default_config()
  with config.unlocked():
    config.stages = ml_collections.ConfigDict(
      {
        'pre': {'kind': 'fp', 'num_epochs': 3},
        'warm': {'kind': 'fp', 'num_epochs': 1, 'learning_rate': 1e-4},
        'ternarize': {'kind': 'ec2t', 'num_epochs': 4, 'gamma': 0},  # An int: still set.
        'freeze': {'kind': 'frozen', 'num_epochs': 2},
        'prune': {'kind': 'ecp', 'num_epochs': 1, 'gamma': 0.05},
      }
    )
    config.stage_order = order
  config.lock()
  return config


def _valid(config):
  """The trainer's own check of the stages."""
  parse_lib.stage_specs(config.to_dict())


def test_default_form_fp_part_and_point():
  config = _default_config()
  before = config.to_dict()
  fp = sweep.fp_part(config)
  assert (fp.fp.num_epochs, fp.ec2t.num_epochs, fp.ec2t.frozen_epochs) == (10, 0, 0)
  point = sweep.point_config(config, 0.3, 0.5, '/sw/fp/fp_variables')
  assert (point.ec2t.gamma, point.ec2t.init_scale) == (0.3, 0.5)
  assert (point.fp.num_epochs, point.ec2t.num_epochs, point.ec2t.frozen_epochs) == (0, 8, 4)
  assert point.init_from == '/sw/fp/fp_variables'
  own = sweep.point_config(config, 0, 1, None)  # No shared part: the config's own fp stage.
  assert (own.fp.num_epochs, own.init_from, own.ec2t.gamma) == (10, '', 0.0)
  assert config.to_dict() == before and config.is_locked
  with config.unlocked():
    config.fp.num_epochs = 0
  assert sweep.fp_part(config) is None


def test_explicit_stages_fp_part_and_point():
  config = _explicit_config()
  before = config.to_dict()
  fp = sweep.fp_part(config)
  assert fp.stage_order == 'pre,warm' and sorted(fp.stages.keys()) == ['pre', 'warm']
  _valid(fp)
  point = sweep.point_config(config, 0.15, 0.3, '/sw/fp/fp_variables')
  assert point.stage_order == 'ternarize,freeze,prune'
  assert sorted(point.stages.keys()) == ['freeze', 'prune', 'ternarize']
  assert point.init_from == '/sw/fp/fp_variables'
  assert (point.stages.ternarize.gamma, point.stages.ternarize.init_scale) == (0.15, 0.3)
  assert (point.ec2t.gamma, point.ec2t.init_scale) == (0.15, 0.3)
  assert point.stages.prune.gamma == 0.05 and 'init_scale' not in point.stages.prune
  assert point.fp.num_epochs == 10  # The default form's fields are not the run's here.
  _valid(point)
  only = sweep.point_config(config, 0.2, 0.4, '/x', stages=['prune'])
  assert only.stages.prune.gamma == 0.2 and only.stages.ternarize.gamma == 0
  assert config.to_dict() == before
  # A run that begins with EC2T has no shared part; its points keep every stage.
  late = _explicit_config('ternarize,freeze,pre,warm,prune')
  assert sweep.fp_part(late) is None
  assert sweep.point_config(late, 0.1, 0.2).stage_order == 'ternarize,freeze,pre,warm,prune'


@pytest.mark.parametrize(
  'form, gamma, init_scale, stages, match',
  [
    ('default', -0.1, 0.3, None, r'gamma=-0.1 is out of range; valid: a finite number >= 0'),
    ('default', 0.1, 0.0, None, r'init_scale=0.0 is out of range; valid: a finite number > 0'),
    ('default', float('nan'), 0.3, None, 'gamma=nan is out of range'),
    ('default', 0.1, 0.3, ['ternarize'], 'the config has no config.stages'),
    ('explicit', 0.1, 0.3, ['nope'], r"\['nope'\].*valid: ternarize,prune"),
    ('explicit', 0.1, 0.3, ['freeze'], r"\['freeze'\].*valid: ternarize,prune"),
  ],
)
def test_bad_points_are_one_line_errors(form, gamma, init_scale, stages, match):
  config = _default_config() if form == 'default' else _explicit_config()
  with pytest.raises(ValueError, match=match) as e:
    sweep.point_config(config, gamma, init_scale, '/x', stages=stages)
  assert '\n' not in str(e.value)


def test_nothing_after_full_precision_is_refused():
  config = _default_config()
  with config.unlocked():
    config.ec2t.num_epochs = config.ec2t.frozen_epochs = 0
  with pytest.raises(ValueError, match='ec2t.num_epochs and .* are 0, so γ and s change nothing'):
    sweep.point_config(config, 0.1, 0.3, '/x')
  config = _explicit_config()
  with config.unlocked():
    for name in ('ternarize', 'freeze', 'prune'):
      config.stages[name].num_epochs = 0
  with pytest.raises(ValueError, match="'pre,warm,ternarize,freeze,prune' has no non-fp stage"):
    sweep.point_config(config, 0.1, 0.3)
  # Stages the order does not run: the trainer's own refusal, word for word.
  with pytest.raises(ValueError, match=r"config.stage_order='pre,warm' does not run them"):
    sweep.point_config(_explicit_config('pre,warm'), 0.1, 0.3)


@pytest.mark.parametrize('method', ['absmean', 'twn'])
def test_a_baseline_method_is_refused(method):
  config = _default_config()
  with config.unlocked():
    config.method = method
  with pytest.raises(ValueError, match=f"config.method='{method}' has no γ or s to sweep"):
    sweep.point_config(config, 0.1, 0.3, '/x')


def test_names_and_values():
  assert sweep.point_name(0.15, 0.3) == 'g0.15_s0.3'
  assert sweep.point_name(0, 1) == 'g0_s1'
  assert sweep.parse_values('0, 0.15,0.3,0', '--gammas') == [0.0, 0.15, 0.3]
  assert sweep.parse_values(['0.5'], '--init_scales') == [0.5]
  with pytest.raises(ValueError, match=r"--gammas: 'x' is not a number; give comma-separated"):
    sweep.parse_values('0,x', '--gammas')


def _tiny(**overrides):
  from conftest import make_tiny_mnist

  return make_tiny_mnist(compilation_cache_dir='', **overrides)


def _rows(markdown):
  """The table rows of sweep.md (one per point)."""
  return [line for line in markdown.splitlines() if line.startswith('| ') and '`g' in line]


def _mtimes(paths):
  return {p: os.stat(p).st_mtime_ns for p in paths}


@pytest.mark.slow
def test_tiny_sweep_trains_fp_once_and_resumes(tmp_path, monkeypatch, capsys):
  from ec2t_jax.training import train

  root = str(tmp_path / 'sweep')
  argv = ['sweep', '--config=mnist:smoke', f'--workdir={root}', '--gammas', '0,0.5']
  argv += ['--init_scales=0.3', '--config.compilation_cache_dir=']
  argv += [f'--config.{key}={value}' for key, value in TINY_OVERRIDES.items()]
  monkeypatch.setattr(sys, 'argv', argv)  # ml_collections reads the overrides from sys.argv.
  level = logging.getLogger().level  # The command line sets INFO; other tests keep theirs.
  try:
    with pytest.raises(SystemExit) as e:
      sweep.run(argv)
  finally:
    logging.getLogger().setLevel(level)
  assert e.value.code in (None, 0)
  out = capsys.readouterr().out
  lines = [line for line in out.splitlines() if line.startswith('point ')]
  assert lines[0] == f'point 1/2: γ=0 s=0.3 training in {root}/g0_s0.3 ...'
  assert lines[1].startswith('point 1/2: γ=0 s=0.3 done in ') and 'test acc 0.' in lines[1]
  assert 'sparsity 0.' in lines[1] and lines[3].startswith('point 2/2: γ=0.5 s=0.3 done')
  assert 'EC2T run summary' not in out  # The trainer's tables go to stderr.

  # The full-precision part ran once, in DIR/fp; the points started from its variables.
  shared = os.path.join(root, 'fp', 'fp_variables')
  assert os.path.isdir(shared)
  fp_config = workdir_lib.read_json_object(os.path.join(root, 'fp', 'config.json'), 'c')
  assert (fp_config['fp.num_epochs'], fp_config['ec2t.num_epochs']) == (1, 0)
  summaries = []
  for name, gamma in (('g0_s0.3', 0.0), ('g0.5_s0.3', 0.5)):
    config = workdir_lib.read_json_object(os.path.join(root, name, 'config.json'), 'c')
    assert (config['fp.num_epochs'], config['init_from']) == (0, shared)
    summary = workdir_lib.read_json_object(os.path.join(root, name, 'summary.json'), 's')
    stages = {s['kind']: s['num_steps'] for s in summary['schedule']['stages']}
    assert stages.get('fp', 0) == 0 and stages['ec2t'] == 3 and stages['frozen'] == 3
    assert (summary['gamma'], summary['init_scale']) == (gamma, 0.3)
    summaries.append(os.path.join(root, name, 'summary.json'))
  record = json.loads(open(os.path.join(root, 'sweep.json')).read())
  assert record['points'] == [[0.0, 0.3], [0.5, 0.3]] and 'ec2t.gamma' not in record['base_config']
  text = open(os.path.join(root, 'sweep.md')).read()
  assert len(_rows(text)) == 2 and '`g0_s0.3`' in text and '`g0.5_s0.3`' in text
  for name in ('sweep_accuracy_vs_sparsity.png', 'sweep_accuracy_vs_size.png'):
    assert f']({name})' in text
    assert open(os.path.join(root, name), 'rb').read(8) == b'\x89PNG\r\n\x1a\n'

  # Rerun with a larger grid: only the new point trains, nothing else is touched.
  calls = []
  real = train.train_and_evaluate
  monkeypatch.setattr(
    train, 'train_and_evaluate', lambda c, w: calls.append(w) or real(c, w), raising=True
  )
  fp_summary = os.path.join(root, 'fp', 'summary.json')
  before = _mtimes([fp_summary, *summaries])
  results = sweep.run_sweep(_tiny(), root, [0, 0.5, 1.0], [0.3])
  assert calls == [os.path.join(root, 'g1_s0.3')]
  assert _mtimes([fp_summary, *summaries]) == before
  assert [r['trained'] for r in results] == [False, False, True]
  out = capsys.readouterr().out
  assert 'full precision: finished before' in out
  assert f'point 1/3: γ=0 s=0.3 finished before ({summaries[0]}), skipped: test acc' in out
  text = open(os.path.join(root, 'sweep.md')).read()
  assert len(_rows(text)) == 3

  # Another base config in the same DIR is refused before anything runs.
  with pytest.raises(ValueError, match=r'another base config \(ec2t.sustain: 0.05 -> 0.1\)') as e:
    sweep.run_sweep(_tiny(**{'ec2t.sustain': 0.1}), root, [0], [0.3])
  assert '\n' not in str(e.value) and len(calls) == 1


@pytest.mark.slow
def test_tiny_sweep_of_explicit_stages(tmp_path, capsys):
  config = _tiny()
  config.stages = ml_collections.ConfigDict(
    {
      'pre': {'kind': 'fp', 'num_epochs': 1},
      'ternarize': {'kind': 'ec2t', 'num_epochs': 1},
      'freeze': {'kind': 'frozen', 'num_epochs': 1},
    }
  )
  config.stage_order = 'pre,ternarize,freeze'
  root = str(tmp_path / 'sweep')
  [result] = sweep.run_sweep(config, root, [0.5], [0.3], write_report=False)
  fp_config = workdir_lib.read_json_object(os.path.join(root, 'fp', 'config.json'), 'c')
  assert fp_config['stage_order'] == 'pre' and 'stages.ternarize.kind' not in fp_config
  point = workdir_lib.read_json_object(os.path.join(root, 'g0.5_s0.3', 'config.json'), 'c')
  assert point['stage_order'] == 'ternarize,freeze' and 'stages.pre.kind' not in point
  assert point['init_from'] == os.path.join(root, 'fp', 'fp_variables')
  assert (point['stages.ternarize.gamma'], point['stages.ternarize.init_scale']) == (0.5, 0.3)
  stages = result['summary']['schedule']['stages']
  assert [(s['name'], s['num_steps']) for s in stages] == [('ternarize', 3), ('freeze', 3)]
  assert 'point 1/1: γ=0.5 s=0.3 done in' in capsys.readouterr().out
