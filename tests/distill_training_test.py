"""Distillation in the training program (`config.distill`): teachers, resume, refusals."""

import pytest

from ec2t_jax import models
from ec2t_jax.training import checkpoint as checkpoint_lib
from ec2t_jax.training import parse as parse_lib
from ec2t_jax.training import train
from ec2t_jax.training import variables as variables_lib

FP = {'distill.teacher': 'fp', 'distill.weight': 0.5, 'distill.temperature': 2.0}


def _lenet_variables(tmp_path, name, *, num_classes=10, image_shape=(28, 28, 1), seed=3):
  model = models.create('lenet5', num_classes=num_classes)
  variables = variables_lib.initial_variables(model, image_shape, seed)
  path = str(tmp_path / name)
  checkpoint_lib.save_variables(path, variables)
  return path


@pytest.mark.slow  # Trains tiny runs end to end.
def test_a_run_distilled_from_its_fp_network_resumes_bit_identically(
  tmp_path, tiny_mnist, sigterm_at, monkeypatch
):
  whole = train.train_and_evaluate(tiny_mnist(**FP), str(tmp_path / 'whole'))
  assert whole['distill_teacher'] == 'fp' and len(whole['teacher_sha256']) == 64
  sigterm_at(5)  # In the EC2T stage (3 fp steps): after the teacher was saved.
  assert train.train_and_evaluate(tiny_mnist(**FP), str(tmp_path / 'run'))['step'] == 5
  assert (tmp_path / 'run' / 'teacher_variables').is_dir()  # Saved as the fp stage ended.
  monkeypatch.undo()
  resumed = train.train_and_evaluate(tiny_mnist(**FP), str(tmp_path / 'run'))
  assert resumed['params_sha256'] == whole['params_sha256']
  assert resumed['teacher_sha256'] == whole['teacher_sha256']
  # Distilling changes the network (the teacher's soft targets reach the student).
  plain = train.train_and_evaluate(tiny_mnist(), str(tmp_path / 'plain'))
  assert plain['params_sha256'] != whole['params_sha256']


@pytest.mark.slow  # Trains tiny runs end to end.
def test_a_resume_with_another_teacher_is_refused(tmp_path, tiny_mnist, sigterm_at):
  teacher = _lenet_variables(tmp_path, 'teacher')
  config = {'distill.teacher': teacher, 'distill.weight': 0.5}
  sigterm_at(4)
  assert train.train_and_evaluate(tiny_mnist(**config), str(tmp_path / 'run'))['step'] == 4
  # The same path now holds another network (same shapes).
  import shutil

  shutil.rmtree(teacher)
  _lenet_variables(tmp_path, 'teacher', seed=4)
  with pytest.raises(ValueError, match='were trained with another teacher') as e:
    train.train_and_evaluate(tiny_mnist(**config), str(tmp_path / 'run'))
  assert '\n' not in str(e.value)


@pytest.mark.parametrize(
  'teacher_kwargs, message',
  [
    ({'num_classes': 5}, r'fc3/kernel: expected \(84, 10\), found \(84, 5\)'),
    ({'image_shape': (32, 32, 3)}, r'conv1/kernel: expected \(5, 5, 1, 6\)'),
  ],
)
def test_a_teacher_for_other_classes_or_inputs_is_refused_before_the_claim(
  tmp_path, tiny_mnist, teacher_kwargs, message
):
  teacher = _lenet_variables(tmp_path, 'teacher', **teacher_kwargs)
  workdir = tmp_path / 'run'
  config = tiny_mnist(**{'distill.teacher': teacher, 'distill.weight': 0.5})
  with pytest.raises(ValueError, match=message) as e:
    train.train_and_evaluate(config, str(workdir))
  assert 'config.distill.teacher=' in str(e.value) and '\n' not in str(e.value).strip()
  assert not workdir.exists()


def test_a_workdir_teacher_for_other_classes_is_refused(tmp_path, tiny_mnist, trained_workdir):
  # The trained run has 10 classes; a 12-class student cannot learn from it.
  config = tiny_mnist(num_classes=12, **{'distill.teacher': trained_workdir, 'distill.weight': 0.5})
  with pytest.raises(ValueError, match=r'num_classes 10 \(this run: 12\)'):
    parse_lib.parse(config)


@pytest.mark.slow  # Trains tiny runs end to end.
def test_a_workdir_teacher_trains_the_student(tmp_path, tiny_mnist, trained_workdir):
  config = tiny_mnist(**{'distill.teacher': trained_workdir, 'distill.weight': 0.7})
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['distill_teacher'] == trained_workdir and summary['steps'] == 9


@pytest.mark.slow  # Trains tiny runs end to end.
@pytest.mark.parametrize('method', ['absmean', 'twn'])
def test_the_baselines_distill_too(tmp_path, tiny_mnist, method):
  summary = train.train_and_evaluate(tiny_mnist(method=method, **FP), str(tmp_path / method))
  assert summary['method'] == method and summary['distill_teacher'] == 'fp'


@pytest.mark.parametrize(
  'overrides, message',
  [
    (
      {'distill.weight': 0.5, 'stages.s.distill_weight': 0.3},
      'set distill_weight > 0 but config.distill.teacher is empty',
    ),
    ({'distill.teacher': 'fp', 'distill.temperature': 0.0}, 'temperature=0.0; valid'),
    ({'distill.teacher': 'fp', 'distill.weight': 2.0}, r'weight=2.0; valid: a number in \[0, 1\]'),
  ],
)
def test_bad_distillation_settings_are_refused(tiny_mnist, overrides, message):
  import ml_collections

  stages = ml_collections.ConfigDict({'s': {'kind': 'ec2t', 'num_epochs': 1}})
  config = tiny_mnist(stages=stages, stage_order='s', **overrides)
  with pytest.raises(ValueError, match=message):
    parse_lib.parse(config, check_data=False)


def test_the_fp_teacher_cannot_teach_its_own_stage(tiny_mnist):
  import ml_collections

  config = tiny_mnist(**FP)
  config.stages = ml_collections.ConfigDict(
    {
      'fp': {'kind': 'fp', 'num_epochs': 1, 'distill_weight': 0.5},
      'tern': {'kind': 'ec2t', 'num_epochs': 1},
    }
  )
  config.stage_order = 'fp,tern'
  with pytest.raises(ValueError, match=r"config.stages.fp distills from teacher='fp'"):
    parse_lib.parse(config, check_data=False)
  config.stages.fp.distill_weight = 0.0
  config.init_from = ''
  config.stage_order = 'tern'
  del config.stages['fp']
  with pytest.raises(ValueError, match='no full-precision stage and no config.init_from'):
    parse_lib.parse(config, check_data=False, check_init_from=False)


def test_distill_stages_chooses_the_stages_that_distill(tiny_mnist):
  import ml_collections

  def weights(config):
    return {s.name: s.distillation for s in parse_lib.parse(config, check_data=False).stages}

  assert weights(tiny_mnist(**FP)) == {'fp': (0.0, 2.0), 'ec2t': (0.5, 2.0), 'frozen': (0.5, 2.0)}
  only_frozen = tiny_mnist(**{**FP, 'distill.stages': 'frozen', 'distill.weight': 0.9})
  assert weights(only_frozen) == {'fp': (0.0, 2.0), 'ec2t': (0.0, 2.0), 'frozen': (0.9, 2.0)}
  # Named stages: a frozen stage continues its EC2T stage's, or sets its own.
  config = tiny_mnist(**FP)
  config.stages = ml_collections.ConfigDict(
    {
      'fp': {'kind': 'fp', 'num_epochs': 1},
      'tern': {'kind': 'ec2t', 'num_epochs': 1, 'distill_weight': 0.2},
      'hold': {'kind': 'frozen', 'num_epochs': 1},
    }
  )
  config.stage_order = 'fp,tern,hold'
  assert weights(config)['hold'] == (0.2, 2.0)
  config.stages.hold.distill_weight = 0.7
  config.stages.hold.distill_temperature = 1.0
  assert weights(config)['hold'] == (0.7, 1.0)
  config.distill.stages = 'tern,hld'
  with pytest.raises(ValueError, match=r"config.distill.stages names \['hld'\].*valid: fp, tern"):
    parse_lib.parse(config, check_data=False)


@pytest.mark.slow  # Trains tiny runs end to end.
def test_distilling_only_the_frozen_stage_leaves_the_ec2t_stage_alone(
  tmp_path, tiny_mnist, trained_workdir, sigterm_at, monkeypatch
):
  import json

  config = {**FP, 'distill.stages': 'frozen'}
  whole = train.train_and_evaluate(tiny_mnist(**config), str(tmp_path / 'whole'))
  plain = json.load(open(f'{trained_workdir}/summary.json'))
  assert whole['params_sha256'] != plain['params_sha256']  # The frozen stage distilled.
  sigterm_at(6)  # Where the EC2T stage ends (3 fp + 3 EC2T steps).
  stopped = train.train_and_evaluate(tiny_mnist(**config), str(tmp_path / 'run'))
  sigterm_at(6)
  plain_stopped = train.train_and_evaluate(tiny_mnist(), str(tmp_path / 'plain'))
  assert stopped['step'] == plain_stopped['step'] == 6

  def params_at_stop(name):
    from ec2t_jax.training import setup as setup_lib
    from ec2t_jax.training import workdir as workdir_lib

    return setup_lib.params_sha256(workdir_lib.load_workdir(str(tmp_path / name)).variables)

  assert params_at_stop('run') == params_at_stop('plain')  # The EC2T stage did not distill.
  monkeypatch.undo()
  resumed = train.train_and_evaluate(tiny_mnist(**config), str(tmp_path / 'run'))
  assert resumed['params_sha256'] == whole['params_sha256']
