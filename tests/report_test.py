"""Tests of `ec2t_jax.report`: thresholds, phases, and a full report of a tiny run."""

import os
import types

import jax.numpy as jnp
import numpy as np
import pytest

from ec2t_jax import report, ternary
from ec2t_jax.training import parse as parse_lib
from ec2t_jax.training import schedule as schedule_lib


@pytest.mark.parametrize('seed, gamma', [(0, 0.0), (1, 0.15), (2, 0.5), (3, 2.0)])
def test_thresholds_reproduce_the_assignment(seed, gamma):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(4000).astype(np.float32) * 0.1
  centroids = np.array([0.12, 0.09], np.float32)
  result = ternary.assign(jnp.asarray(w), jnp.asarray(centroids), gamma=gamma)
  t_n, t_p = report.decision_thresholds(centroids, np.asarray(result.pmf), float(result.lam))
  predicted = np.where(w > t_p, ternary.POS, np.where(w < t_n, ternary.NEG, ternary.ZERO))
  away = (np.abs(w - t_p) > 1e-6) & (np.abs(w - t_n) > 1e-6)
  np.testing.assert_array_equal(predicted[away], np.asarray(result.assignment)[away])
  if gamma == 0.0:
    assert (t_n, t_p) == pytest.approx((-0.045, 0.06))
  else:
    assert t_p > 0.06 and t_n < -0.045  # λ > 0 widens the zero interval.


def test_phase_boundaries_come_from_the_schedule():
  config = {'fp': {'num_epochs': 8}, 'ec2t': {'num_epochs': 10, 'frozen_epochs': 5}}
  schedule = schedule_lib.create_schedule(parse_lib.stage_specs(config), steps_per_epoch=215)
  assert report.phase_boundaries(schedule) == {'ec2t': 1720, 'frozen': 3870}
  config = {'fp': {'num_epochs': 0}, 'ec2t': {'num_epochs': 2, 'frozen_epochs': 0}}
  schedule = schedule_lib.create_schedule(parse_lib.stage_specs(config), steps_per_epoch=5)
  assert report.phase_boundaries(schedule) == {}  # One stage with steps: nothing to mark.


def test_phase_boundaries_of_named_stages():
  # Stages as the schedule names them; unnamed ones (older schedules) go by their kind.
  stage = lambda kind, start, n, name='': types.SimpleNamespace(
    kind=kind, start=start, num_steps=n, name=name
  )
  schedule = types.SimpleNamespace(
    stages=(
      stage('fp', 0, 10, 'pretrain'),
      stage('ec2t', 10, 30, 'ternarize'),
      stage('frozen', 40, 10, 'frozen'),
      stage('ecp', 50, 0, 'skipped'),
      stage('ecp', 50, 20, 'prune'),
      stage('frozen', 70, 5),  # Unnamed: its kind, made unique.
    )
  )
  assert report.phase_boundaries(schedule) == {
    'ternarize': 10,
    'frozen': 40,
    'prune': 50,
    'frozen_2': 70,
  }
  # The first stage with steps starts the curves: it needs no mark.
  later = types.SimpleNamespace(stages=schedule.stages[1:])
  assert report.phase_boundaries(later) == {'frozen': 40, 'prune': 50, 'frozen_2': 70}
  old = types.SimpleNamespace(stages=(stage('fp', 0, 3), stage('ec2t', 3, 3)))
  del old.stages[0].name, old.stages[1].name  # Today's Stage without a name field.
  assert report.phase_boundaries(old) == {'ec2t': 3}


def test_report_of_two_runs(trained_workdir, tmp_path):
  workdir = trained_workdir
  out = tmp_path / 'report'
  assert report.main(['--workdir', workdir, '--workdir', workdir, '--out', str(out)]) == 0
  text = (out / 'report.md').read_text()
  images = sorted(p for p in os.listdir(out) if p.endswith('.png'))
  label = os.path.basename(workdir)
  assert images == sorted(
    [
      f'{lb}_{kind}.png'
      for lb in (label, f'{label}_2')
      for kind in ('curves', 'layers', 'histograms')
    ]
    + ['accuracy_vs_sparsity.png', 'accuracy_vs_size.png']
  )
  for name in images:
    assert f']({name})' in text
    data = (out / name).read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) < 300_000
  for heading in ('## Summary', '## Cost under the MicroNet rules', '## Storage', '## Comparison'):
    assert heading in text
  for layer in ('conv1/kernel', 'conv2/kernel', 'fc1/kernel', 'fc2/kernel'):
    assert f'| {layer} |' in text


def test_missing_workdir(tmp_path, capsys):
  assert report.main(['--workdir', str(tmp_path / 'nothing'), '--out', str(tmp_path / 'r')]) == 2
  assert 'no summary.json' in capsys.readouterr().err
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  assert report.main(['--workdir', str(tmp_path / 'nothing'), '--out', str(blocker)]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: --out') and 'not a directory' in err and err.count('\n') == 1
  with pytest.raises(ValueError, match='at least one workdir'):
    report.write_report([], str(tmp_path / 'r'))
