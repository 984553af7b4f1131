"""Smoke tests of `bench/performance.py`: every timing subcommand runs on a tiny model."""

import json
import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'bench'))

import performance  # noqa: E402

from ec2t_jax import transforms  # noqa: E402

pytestmark = pytest.mark.slow  # Subprocesses or long runs: left out of `make test-fast`.


@pytest.fixture(autouse=True)
def _restore_globals():
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs')
  before = {name: getattr(jax.config, name) for name in names}
  yield
  transforms._FENCE_UPDATES = True
  for name, value in before.items():
    jax.config.update(name, value)


def test_step_writes_ratios(tmp_path, capsys):
  out = tmp_path / 'step.json'
  args = ['step', '--models', 'lenet5', '--dtypes', 'float32', '--batch', '8', '--steps', '2']
  performance.main([*args, '--fence_updates', '0', '--json', str(out)])
  (row,) = json.loads(out.read_text())['result']
  assert row['model'] == 'lenet5' and row['fence_updates'] is False
  assert row['adam_ms'] > 0 and row['ec2t_ms'] > 0
  assert row['ratio'] == pytest.approx(row['ec2t_ms'] / row['adam_ms'])
  assert '| lenet5 | float32 |' in capsys.readouterr().out


def test_update_and_compile_measure_both_optimizers(tmp_path):
  (update,) = performance.main(['update', '--models', 'lenet5', '--repeats', '1'])
  assert update['ternary_layers'] == 3 and update['adam_ms'] > 0 and update['ec2t_ms'] > 0
  out = tmp_path / 'compile.json'
  args = ['compile', '--models', 'lenet5', '--batch', '4', '--part', 'update', '--optimizers']
  args.append('adam,adam_if_finite,ec2t_grouped,ec2t_per_layer,ec2t_trainer')
  performance.main([*args, '--cache_dir', str(tmp_path / 'cache'), '--json', str(out)])
  (row,) = json.loads(out.read_text())['result']
  for key in ('adam', 'adam_if_finite', 'ec2t_grouped', 'ec2t_per_layer', 'ec2t_trainer'):
    assert row[f'{key}_s'] > 0 and row[f'{key}_cached_s'] > 0, key
  # optax's NaN skip wraps Adam in a conditional: its kernels sit in the branches.
  assert row['adam_if_finite_kernel_ops'] > row['adam_if_finite_entry_ops']
  ratio = row['ec2t_grouped_s'] / row['adam_if_finite_s']
  assert row['ec2t_grouped_over_adam_if_finite'] == pytest.approx(ratio)
  assert row['distinct_shapes'] <= row['ternary_layers'] == 3


def test_step_overhead_runs_performance_step():
  sys.path.insert(0, os.path.dirname(performance.__file__))
  import step_overhead

  row = step_overhead.main(['--model', 'lenet5', '--batch', '4', '--steps', '1'])
  assert row['model'] == 'lenet5' and row['batch'] == 4 and row['ratio'] > 0


def test_pipeline_on_jpeg_records_reports_workers_to_feed_a_target():
  source = performance.JpegSource(3)
  record = source[0]
  assert record['image'].dtype.name == 'uint8' and record['image'].shape[-1] == 3
  assert 300 <= min(record['image'].shape[:2]) and source.mean_bytes > 10_000
  args = ['pipeline', '--dataset', 'imagenet2012', '--examples', '8', '--batch', '4']
  result = performance.main(
    [*args, '--batches', '2', '--workers', '0', '--steps', '0'] + ['--target', '1000']
  )
  rate = result['pipeline_images_per_s_per_worker0']
  assert rate > 0 and result['workers_to_feed_target'] == -(-1000 // rate)


def test_torch_ec2t_stand_in_follows_the_algorithm():
  """The PyTorch EC2T stand-in of `bench/performance.py torch` assigns as ec2t_jax.ternary does."""
  torch = pytest.importorskip('torch')
  import numpy as np
  import torch_models

  from ec2t_jax import ternary

  torch.manual_seed(0)
  net = torch_models.LeNet5()
  names = ['conv2.weight', 'fc1.weight']
  stand_in = performance.TorchEC2T(torch, net, names, gamma=0.15, init_scale=0.3)
  params = dict(net.named_parameters())
  for w, c, a in zip(stand_in.latent, stand_in.centroids, stand_in.assignment, strict=True):
    w_np, c_np = w.detach().numpy(), c.detach().numpy()
    # Initialization (docs/algorithm.md §2): s·|max W|, s·|min W|, nearest neighbour.
    np.testing.assert_allclose(c_np, 0.3 * np.abs([w_np.max(), w_np.min()]), rtol=1e-5)
    np.testing.assert_array_equal(a.numpy(), np.asarray(ternary.nearest(w_np, c_np)))
    # The entropy-constrained assignment of one layer equals ternary.assign's.
    delta = 0.7
    ours = ternary.assign(w_np, c_np, gamma=0.15, delta=delta).assignment
    np.testing.assert_array_equal(stand_in._assign(w, c, delta).numpy(), np.asarray(ours))
  x = torch.randn(8, 1, 28, 28)
  y = torch.randint(0, 10, (8,))
  for _ in range(2):
    assert torch.isfinite(stand_in.step(x, y))
  for name, c in zip(names, stand_in.centroids, strict=True):
    levels = np.unique(params[name].detach().numpy())
    wp, wn = c.detach().numpy()
    assert set(levels.tolist()) <= {np.float32(-wn), 0.0, np.float32(wp)}, name


def test_profile_sums_op_time_by_kind(tmp_path):
  out = tmp_path / 'profile.json'
  performance.main(
    ['profile', '--model', 'lenet5', '--batch', '8', '--steps', '1', '--json', str(out)]
  )
  rows = json.loads(out.read_text())['result']
  assert rows and all(r['ms_per_step'] >= 0 and r['ops_per_step'] >= 0 for r in rows)
  assert any('conv' in r['kind'] or 'fusion' in r['kind'] for r in rows)


def test_distillation_bench_pairs_each_run_with_its_undistilled_twin(tmp_path):
  """`bench/distillation.py --smoke`: one fp network, a run without and one with, a table."""
  import distillation  # bench/distillation.py

  workdir = tmp_path / 'kd'
  args = ['--model', 'lenet5', '--smoke', '--methods', 'ec2t', '--gammas', '0.3']
  args += ['--init_scales', '0.5', '--seeds', '0', '--distill', 'w=0.9,T=1,stages=frozen']
  points = distillation.main([*args, '--workdir', str(workdir)])
  assert [p['distilled'] for p in points] == ['', 'w=0.9, T=1, frozen']
  plain, distilled = points
  rows = json.loads((workdir / 'distillation.json').read_text())['rows']
  assert {r['seed'] for r in rows} == {0} and len(rows) == 2
  for r in rows:  # Relative to the workdir, so the raw results name no machine's paths.
    assert (workdir / r['workdir'] / 'summary.json').exists() and (workdir / r['file']).exists()
    assert not os.path.isabs(r['workdir']) and not os.path.isabs(r['file'])
  for p in points:
    assert 0 < p['bits_per_ternary_weight'][0] < 1.6 and p['seeds'] == 1
  gain = 100 * (distilled['test_accuracy'][0] - plain['test_accuracy'][0])
  table = (workdir / 'distillation.md').read_text()
  assert f'| {gain:+.2f} ± 0.00 |' in table
  assert (workdir / 'distillation_front.png').stat().st_size > 0
  # A rerun trains nothing: every run has its summary.
  runs = sorted(os.listdir(workdir / 'runs'))
  log = (workdir / 'log.txt').read_text()
  assert distillation.main([*args, '--workdir', str(workdir)]) == points
  assert (workdir / 'log.txt').read_text() == log and sorted(os.listdir(workdir / 'runs')) == runs
  # --include shows an earlier invocation's runs without training anything.
  included = ['--model', 'lenet5', '--smoke', '--methods', 'none']
  included += ['--include', str(workdir / 'distillation.json'), '--workdir', str(tmp_path / 'all')]
  assert distillation.main(included) == points
  assert not (tmp_path / 'all' / 'fp').exists()
  assert f'| {gain:+.2f} ± 0.00 |' in (tmp_path / 'all' / 'distillation.md').read_text()
  with pytest.raises(
    SystemExit, match='is both in kd/distillation.json and in kd/distillation.json'
  ):
    distillation.main([*included, '--include', str(workdir / 'distillation.json')])
  with pytest.raises(SystemExit, match="holds runs of --model 'lenet5'"):
    distillation.main(['--model', 'vit', *included[2:]])
  with pytest.raises(SystemExit, match='nothing to show'):
    distillation.main([*included[:5], '--workdir', str(tmp_path / 'none')])
  assert not (tmp_path / 'none').exists()  # Refused before the workdir is made.


def test_distillation_setting_names_its_teacher_and_refuses_a_missing_one(tmp_path):
  """`--distill ...,teacher=DIR`: the run's name and label carry it; a missing DIR is refused."""
  import distillation  # bench/distillation.py

  plain = distillation._setting('w=0.9,T=1')
  assert plain['teacher'] == 'fp' and plain['label'] == 'w=0.9, T=1'
  assert distillation._name('ec2t', 0.3, 0.5, 1, plain) == 'ec2t_g0.3_s0.5_seed1_kd_w0.9_T1'
  teacher = tmp_path / 'r20'
  teacher.mkdir()
  wide = distillation._setting(f'w=0.9,T=2,stages=frozen,teacher={teacher}')
  assert wide['teacher'] == str(teacher) and wide['label'] == 'w=0.9, T=2, frozen, teacher r20'
  name = distillation._name('ec2t', 0.3, 0.5, 1, wide)
  assert name == 'ec2t_g0.3_s0.5_seed1_kd_w0.9_T2_frozen_tr20'
  with pytest.raises(SystemExit, match='does not exist'):
    distillation._setting(f'w=0.9,T=1,teacher={tmp_path / "missing"}')
  with pytest.raises(SystemExit, match='expected w='):
    distillation._setting('w=0.9,T=1,teacher_dir=x')
