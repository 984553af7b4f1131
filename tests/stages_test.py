"""Runs as configured stages: the schedule, the passes' masks, validation, and staged runs."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import ec2t_jax
from ec2t_jax import models, ternary, transforms, tree_util
from ec2t_jax.configs import default, imagenet
from ec2t_jax.training import checkpoint as checkpoint_lib
from ec2t_jax.training import parse as parse_lib
from ec2t_jax.training import schedule as schedule_lib
from ec2t_jax.training import setup as setup_lib
from ec2t_jax.training import stages as stages_lib
from ec2t_jax.training import train
from ec2t_jax.training import workdir as workdir_lib

CONV = r'conv[12]/kernel$'
FC = r'fc[12]/kernel$'


def _stages(config, order, **stages):
  config.stages = ml_collections.ConfigDict(stages)
  config.stage_order = order
  return config


def _three_passes(config):
  """fp → ternarize the convs → frozen (from best) → prune fc1/fc2 (from best)."""
  return _stages(
    config,
    'fp,ternarize,frozen,prune',
    fp={'kind': 'fp', 'num_epochs': 1},
    ternarize={'kind': 'ec2t', 'num_epochs': 2, 'ternary_pattern': CONV},
    frozen={'kind': 'frozen', 'num_epochs': 1, 'start_from': 'best'},
    prune={'kind': 'ecp', 'num_epochs': 1, 'start_from': 'best', 'prune_pattern': FC, 'gamma': 0.3},
  )


# --- the schedule (no model, no data) ---------------------------------------------------------


def test_default_sequence_is_fp_ec2t_frozen_in_two_passes():
  config = default.get_config()
  config.fp.num_epochs = 2
  schedule = schedule_lib.create_schedule(parse_lib.stage_specs(config), steps_per_epoch=5)
  assert [
    (s.name, s.kind, s.start, s.end, s.pass_index, s.start_from) for s in schedule.stages
  ] == [
    ('fp', 'fp', 0, 10, 0, 'last'),
    ('ec2t', 'ec2t', 10, 110, 1, 'last'),
    ('frozen', 'frozen', 110, 185, 1, 'last'),
  ]
  assert schedule.freeze_step(1) == 100
  assert schedule.transition_at(10).name == 'ec2t'
  assert schedule.transition_at(110).name == 'frozen'
  assert schedule.transition_at(50) is None
  assert not schedule.compressed_at(9) and schedule.compressed_at(10)
  assert schedule_lib.Schedule.from_dict(schedule.to_dict()) == schedule


def test_a_new_stage_kind_is_one_entry_in_the_stage_module(tiny_mnist, tmp_path, monkeypatch):
  # A 'polish' kind: full-precision fine-tuning of the leaves compression left alone, after the
  # frozen stage. Nothing but its StageKind is added; parse, schedule, set-up and trainer ask it.
  polish = stages_lib.StageKind('polish', 'polish', 'fp', compresses=False, marker='polish starts')
  monkeypatch.setitem(stages_lib.KINDS, 'polish', polish)
  config = _stages(
    tiny_mnist(),
    'fp,ternarize,frozen,polish',
    fp={'kind': 'fp', 'num_epochs': 1},
    ternarize={'kind': 'ec2t', 'num_epochs': 1, 'ternary_pattern': CONV},
    frozen={'kind': 'frozen', 'num_epochs': 1},
    polish={'kind': 'polish', 'num_epochs': 1, 'learning_rate': 1e-4},
  )
  specs = parse_lib.stage_specs(config)
  assert specs[-1].settings.learning_rate == 1e-4  # Its section's settings, the stage's own first.
  schedule = schedule_lib.create_schedule(specs, steps_per_epoch=3)
  assert [s.pass_index for s in schedule.stages] == [0, 1, 1, 2]
  setup = _setup(config)
  assert not setup.passes[2].compresses
  assert _names(setup.passes[2].fixed_mask) == ['conv1/kernel', 'conv2/kernel']
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['steps'] == 12
  loaded = workdir_lib.load_workdir(str(tmp_path / 'run'))
  assert [s.kind for s in loaded.schedule.stages][-1] == 'polish'
  params = tree_util.flat_dict(loaded.variables['params'])
  for name in ('conv1/kernel', 'conv2/kernel'):  # Still ternary after the fp polish.
    assert len(np.unique(np.asarray(params[name]))) <= 3
  assert len(np.unique(np.asarray(params['fc1/kernel']))) > 3  # Polished in full precision.


def test_three_passes_schedule(tiny_mnist):
  schedule = schedule_lib.create_schedule(
    parse_lib.stage_specs(_three_passes(tiny_mnist())), steps_per_epoch=3
  )
  assert [(s.name, s.start, s.pass_index) for s in schedule.stages] == [
    ('fp', 0, 0),
    ('ternarize', 3, 1),
    ('frozen', 9, 1),
    ('prune', 12, 2),
  ]
  assert schedule.num_passes == 3 and schedule.freeze_step(1) == 6
  assert [schedule.pass_at(s) for s in (2, 3, 8, 9, 11, 12, 14, 15)] == [
    0,
    1,
    1,
    1,
    1,
    2,
    2,
    2,
  ]


@pytest.mark.parametrize(
  'stages, order, message',
  [
    ({'a': {'kind': 'ternary', 'num_epochs': 1}}, 'a', "config.stages.a.kind='ternary'"),
    ({'a': {'kind': 'ec2t', 'num_epochs': 1}}, '', 'config.stage_order is empty'),
    ({'a': {'kind': 'ec2t', 'num_epochs': 1}}, 'a,b', "names ['b']"),
    (
      {'a': {'kind': 'ec2t', 'num_epochs': 1}, 'b': {'kind': 'fp', 'num_epochs': 1}},
      'a',
      "defines ['b']",
    ),
    ({'a': {'kind': 'frozen', 'num_epochs': 1}}, 'a', 'frozen stage'),
    (
      {'a': {'kind': 'fp', 'num_epochs': 1}, 'b': {'kind': 'frozen', 'num_epochs': 1}},
      'a,b',
      "it follows 'a'",
    ),
    ({'a': {'kind': 'ec2t', 'num_epochs': -1}}, 'a', 'num_epochs must be an integer >= 0'),
    ({'a': {'kind': 'ec2t', 'num_epochs': 1, 'start_from': 'best'}}, 'a', 'the first stage'),
    ({'a': {'kind': 'ec2t', 'num_epochs': 1, 'start_from': 'newest'}}, 'a', "'newest'"),
    ({'a': {'kind': 'ec2t', 'num_epochs': 1, 'gama': 0.1}}, 'a', "sets ['gama']"),
    ({'a': {'kind': 'fp', 'num_epochs': 1, 'gamma': 0.1}}, 'a', "sets ['gamma']"),
    (
      {
        'a': {'kind': 'ec2t', 'num_epochs': 1},
        'b': {'kind': 'frozen', 'num_epochs': 1, 'gamma': 0.1},
      },
      'a,b',
      "sets ['gamma']",
    ),  # noqa: E501
    (
      {
        'a': {'kind': 'fp', 'num_epochs': 1},
        'b': {'kind': 'fp', 'num_epochs': 1, 'start_from': 'best'},
      },  # noqa: E501
      'a,b',
      'no EC2T/ECP stage',
    ),
  ],
)
def test_bad_stage_configs_are_refused_in_one_line(stages, order, message):
  config = _stages(default.get_config(), order, **stages)
  with pytest.raises(ValueError, match=None) as e:
    parse_lib.stage_specs(config)
  assert message in str(e.value) and '\n' not in str(e.value)


# --- the passes' masks and optimizers -----------------------------------------------------------


def _setup(config):
  schedule = schedule_lib.create_schedule(parse_lib.stage_specs(config), steps_per_epoch=3)
  return setup_lib.create_setup(
    parse_lib.parse(config, check_data=False), schedule, num_classes=10, image_shape=(28, 28, 1)
  )


def _names(mask):
  return sorted(tree_util.selected_names(mask)) if mask is not None else []


def test_passes_hold_earlier_compressed_leaves_fixed(tiny_mnist):
  setup = _setup(_three_passes(tiny_mnist()))
  fp, tern, prune = setup.passes
  assert fp.kind == 'fp' and fp.fixed_mask is None
  assert _names(tern.ternary_mask) == ['conv1/kernel', 'conv2/kernel'] and tern.fixed_mask is None
  assert _names(prune.ternary_mask) == [] and _names(prune.prune_mask) == FC_NAMES
  assert _names(prune.fixed_mask) == ['conv1/kernel', 'conv2/kernel']
  assert prune.settings.gamma == 0.3 and tern.settings.gamma == 0.15  # Stage over config.ec2t.
  assert _names(setup.ternary_mask) == ['conv1/kernel', 'conv2/kernel']
  assert _names(setup.prune_mask) == FC_NAMES


FC_NAMES = ['fc1/kernel', 'fc2/kernel']


def test_a_fixed_leaf_stays_exactly_as_it_was():
  params = {
    'a': {'kernel': jnp.linspace(-1, 1, 60).reshape(6, 10)},
    'b': {'kernel': jnp.linspace(-1, 1, 12).reshape(3, 4)},
    'c': {'bias': jnp.ones(4)},
  }
  no = jax.tree.map(lambda _: False, params)
  tx = ec2t_jax.ec2t(
    no,
    prune_mask={**no, 'a': {'kernel': True}},
    fixed_mask={**no, 'b': {'kernel': True}},
  )
  opt_state = tx.init(params)
  p = ec2t_jax.ternarize(params, opt_state)
  for _ in range(3):
    updates, opt_state = tx.update(jax.tree.map(jnp.ones_like, p), opt_state, p)
    p = optax.apply_updates(p, updates)
  assert np.array_equal(p['b']['kernel'], params['b']['kernel'])
  assert not np.array_equal(p['c']['bias'], params['c']['bias'])  # Trains in full precision.
  assert float(jnp.mean(p['a']['kernel'] == 0)) > 0  # Pruned.


def test_a_leaf_both_fixed_and_compressed_is_refused():
  params = {'a': {'kernel': jnp.ones((3, 4))}}
  with pytest.raises(ValueError, match='a/kernel is selected by both fixed_mask and ternary_mask'):
    ec2t_jax.param_labels(params, {'a': {'kernel': True}}, None, {'a': {'kernel': True}})


@pytest.mark.parametrize(
  'stage, message',
  [
    (
      {'kind': 'ec2t', 'num_epochs': 1, 'ternary_pattern': CONV, 'fixed_pattern': 'conv1'},
      'config.stages.s: invalid EC2T masks: conv1/kernel is selected by both fixed_mask and '
      'ternary_mask',
    ),
    ({'kind': 'ecp', 'num_epochs': 1}, 'config.stages.s: an ecp stage needs prune_pattern'),
    (
      {'kind': 'ecp', 'num_epochs': 1, 'prune_pattern': 'attention'},
      "config.stages.s: prune_pattern='attention' selects no leaf",
    ),
    (
      {'kind': 'ec2t', 'num_epochs': 1, 'ternary_pattern': 'nothing_here'},
      'config.stages.s: ternary_mask selects no parameter',
    ),
    (
      {'kind': 'ec2t', 'num_epochs': 1, 'fixed_pattern': 'nothing_here'},
      "config.stages.s: fixed_pattern='nothing_here' selects no leaf",
    ),
  ],
)
def test_bad_stages_are_refused_before_the_workdir_is_touched(tmp_path, tiny_mnist, stage, message):
  config = _stages(tiny_mnist(), 's', s=stage)
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(config, str(workdir))
  assert str(e.value).startswith(message) and '\n' not in str(e.value)
  assert not workdir.exists()


def test_start_from_best_needs_a_validation_split(tmp_path, tiny_mnist):
  config = tiny_mnist(validation_size=0, **{'ec2t.frozen_start_from': 'best'})
  with pytest.raises(ValueError, match=r"stage 'frozen' starts from the best.*validation_size=0"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_a_recipe_for_pretrained_weights_refuses_random_init(tmp_path, tiny_mnist):
  config = tiny_mnist(needs_init_from=True, **{'fp.num_epochs': 0})
  with pytest.raises(ValueError, match=r'config.init_from is empty.*needs_init_from=False'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
  config = imagenet.get_config('efficientnet_b1')
  with pytest.raises(ValueError, match='config.init_from is empty'):
    train.validate_config(config)
  config.needs_init_from = False
  train.validate_config(config)  # Said explicitly: allowed.


# --- ECP's δ within its own pass -----------------------------------------------------------------


def _b1_params():
  model = models.create('efficientnet_b1', num_classes=1000)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  )
  return model, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes['params'])


def _ecp_layout(p, params):
  opt_state = jax.eval_shape(p.tx.init, params)
  (ecp,) = [
    s
    for s in ec2t_jax.state_utils.compression_states(opt_state)
    if isinstance(s, transforms.EntropyConstrainedPruningState)
  ]
  return ecp.layout


def test_ecp_delta_uses_the_largest_layer_of_its_own_pass():
  model, params = _b1_params()
  sizes = {n: int(np.size(x)) for n, x in tree_util.named_leaves(params)}
  se = {n: s for n, s in sizes.items() if 'se_reduce/kernel' in n or 'se_expand/kernel' in n}
  config = imagenet.get_config('efficientnet_b1')
  config.stage_order = 'ternarize,frozen,prune'
  config.stages.prune.prune_pattern = r'(se_reduce|se_expand)/kernel$'  # SE pruned alone.
  schedule = schedule_lib.create_schedule(parse_lib.stage_specs(config), steps_per_epoch=1)
  run = parse_lib.parse(config, check_data=False, check_init_from=False)
  passes = setup_lib._create_passes(run, schedule, model, params, (32, 32, 3))
  layout = _ecp_layout(passes[1], params)
  assert layout.max_size == max(se.values())
  name = max(se, key=se.get)  # The largest SE layer: δ = 1 when SE is pruned alone.
  sustain = config.ec2t.sustain
  # The original's per-layer scaling with N_max over the pass's leaves: (N/N_max + ς)/(1 + ς).
  expected = (se[name] / max(se.values()) + sustain) / (1 + sustain)
  assert float(ternary.layer_weight(se[name], layout.max_size, sustain)) == pytest.approx(expected)
  # Pruned together with the classifier (1.28M weights), the same layer's δ is far smaller.
  joint = (se[name] / sizes['fc/kernel'] + sustain) / (1 + sustain)
  assert expected == pytest.approx(1.0) and joint < 0.3

  # The recipe's pass prunes SE and the classifier together: N_max is the classifier's.
  config = imagenet.get_config('efficientnet_b1')
  run = parse_lib.parse(config, check_data=False, check_init_from=False)
  passes = setup_lib._create_passes(run, schedule, model, params, (32, 32, 3))
  assert _ecp_layout(passes[1], params).max_size == sizes['fc/kernel']
  assert _names(passes[1].fixed_mask) == _names(passes[0].ternary_mask)  # Pass 1 held fixed.


# --- staged runs ---------------------------------------------------------------------------------


def _scripted_validation(monkeypatch, accuracies):
  """Validation accuracies in the order the trainer evaluates ('test' passes through)."""
  split = {'name': None}
  calls = iter(accuracies)
  real_batches, real_evaluate = train.eval_batches, train.evaluate

  def eval_batches(config, data, name):
    split['name'] = name
    return real_batches(config, data, name)

  def evaluate(p_eval_step, state, batches, sharding):
    out = real_evaluate(p_eval_step, state, batches, sharding)
    if split['name'] == 'val' and out:
      out = {**out, 'accuracy': next(calls, 0.0)}
    return out

  monkeypatch.setattr(train, 'eval_batches', eval_batches)
  monkeypatch.setattr(train, 'evaluate', evaluate)


def _checkpoint(workdir, step, setup):
  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=100)
  try:
    target = setup_lib.state_tree(setup_lib.abstract_train_state(setup, step))
    tree, _ = ckpt.restore(step, target)
  finally:
    ckpt.close()
  return tree


@pytest.mark.slow
def test_three_pass_run_starts_from_best_and_holds_earlier_passes(
  tmp_path, tiny_mnist, monkeypatch
):
  # Validation at steps 3 (fp), 6, 9, 12, 15: step 6 is the best of the EC2T pass.
  _scripted_validation(monkeypatch, [0.5, 0.9, 0.5, 0.3, 0.4, 0.4])
  config = _three_passes(tiny_mnist(max_to_keep=100))
  config.magnitude_prune.pattern, config.magnitude_prune.fraction = r'fc3/kernel$', 0.01
  workdir = str(tmp_path / 'run')
  summary = train.train_and_evaluate(config, workdir)
  assert summary['steps'] == 15
  assert 0 <= summary['magnitude_pruned_test_accuracy'] <= 1
  assert [p['name'] for p in summary['passes']] == ['fp', 'ternarize', 'prune']
  setup = _setup(config)
  at = {step: _checkpoint(workdir, step, setup) for step in (6, 8, 9, 12, 15)}
  # The frozen stage starts from step 6 (the best), not from step 9's last state ...
  assert tree_util.flat_dict(at[9]['params']).keys() == tree_util.flat_dict(at[6]['params']).keys()
  for name, leaf in tree_util.named_leaves(at[9]['params']):
    assert np.array_equal(leaf, tree_util.flat_dict(at[6]['params'])[name]), name
  # ... with the assignment frozen from its first update on (the counters set to the switch).
  counts = [int(s.count) for s in ec2t_jax.state_utils.compression_states(at[9]['opt_state'])]
  assert counts == [6]
  # The prune pass starts from the best of the ternarize pass (still step 6), holds the ternary
  # convs fixed, and prunes fc1/fc2 while fc3 trains in full precision.
  final, start = tree_util.flat_dict(at[15]['params']), tree_util.flat_dict(at[12]['params'])
  for name in ('conv1/kernel', 'conv2/kernel'):
    assert np.array_equal(start[name], tree_util.flat_dict(at[6]['params'])[name])
    assert np.array_equal(final[name], start[name])
    assert len(np.unique(final[name])) <= 3
  for name in FC_NAMES:
    assert np.mean(final[name] == 0) > 0.3 and len(np.unique(final[name])) > 3
  assert not np.array_equal(final['fc3/kernel'], start['fc3/kernel'])
  assert summary['best_step'] == 15  # The best slot holds the newest pass's best.
  assert os.path.isdir(os.path.join(workdir, 'fp_variables'))


@pytest.mark.slow
def test_three_pass_run_resumes_exactly_across_stage_boundaries(tmp_path, tiny_mnist, sigterm_at):
  config = _three_passes(tiny_mnist(checkpoint_every_steps=100))
  reference = train.train_and_evaluate(config, str(tmp_path / 'a'))
  sigterm_at(10)  # In the frozen stage, after it started from the best checkpoint.
  assert train.train_and_evaluate(config, str(tmp_path / 'b')) == {'preempted': True, 'step': 10}
  sigterm_at(3)  # In the prune pass.
  assert train.train_and_evaluate(config, str(tmp_path / 'b')) == {'preempted': True, 'step': 13}
  resumed = train.train_and_evaluate(config, str(tmp_path / 'b'))
  assert resumed['params_sha256'] == reference['params_sha256']
  assert resumed['test_accuracy'] == reference['test_accuracy']


@pytest.mark.slow
def test_grow_a_pretrained_base_then_compress_on_mock_cifar(tmp_path, caplog):
  """The paper's pipeline: pretrained base → grown super-network (logits checked) → stages."""
  import logging

  import tensorflow_datasets as tfds

  from ec2t_jax.configs import cifar10

  base_kwargs = {'depth_mult': 0.1, 'width_mult': 0.5}
  base = models.create('micronet', num_classes=10, **base_kwargs)
  variables = setup_lib.initial_variables(base, (32, 32, 3), seed=3)
  # Non-trivial BatchNorm statistics, so that an identity-breaking growth would show.
  rng = np.random.default_rng(0)
  variables['batch_stats'] = jax.tree.map(
    lambda x: np.asarray(x) + rng.uniform(0.1, 0.5, np.shape(x)).astype(np.float32),
    variables['batch_stats'],
  )
  checkpoint_lib.save_variables(str(tmp_path / 'base'), variables)
  config = cifar10.get_config('smoke')
  config.model = 'micronet'
  config.model_kwargs = ml_collections.ConfigDict({'depth_mult': 0.2, 'width_mult': 0.75})
  config.init_from = str(tmp_path / 'base')
  config.grow.base_model = 'micronet'
  config.grow.base_model_kwargs = ml_collections.ConfigDict(base_kwargs)
  config.fp.num_epochs = 0
  with (
    caplog.at_level(logging.INFO),
    tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE),
  ):
    summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['steps'] == 4 and np.isfinite(summary['test_accuracy'])
  assert summary['sparsity'] is not None
  assert 'max |logit difference|' in caplog.text  # Grown logits checked against the base's.


def test_magnitude_pruning_applies_where_the_finished_network_is_read(tmp_path, trained_workdir):
  import json
  import shutil

  from ec2t_jax.training import workdir as workdir_lib

  workdir = str(tmp_path / 'run')
  shutil.copytree(trained_workdir, workdir)
  before = np.asarray(workdir_lib.load_workdir(workdir).variables['params']['fc3']['kernel'])
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    config = json.load(f)
  config['magnitude_prune'] = {'pattern': r'fc3/kernel$', 'fraction': 0.5}
  with open(path, 'w') as f:
    json.dump(config, f)
  run = workdir_lib.load_workdir(workdir)
  after = np.asarray(run.variables['params']['fc3']['kernel'])
  small = np.abs(before) < 0.5 * np.abs(before).max()
  assert small.any() and np.all(after[small] == 0) and np.array_equal(after[~small], before[~small])
  with pytest.raises(ValueError, match="pattern 'nothing' matches no leaf"):
    tree_util.magnitude_prune(run.variables['params'], 'nothing', 0.01)
  with pytest.raises(ValueError, match=r'fraction must be in \[0, 1\), got 1.5'):
    tree_util.magnitude_prune(run.variables['params'], 'fc3', 1.5)
