"""`config.method='twn'` through the program: validation, training, export and report."""

import numpy as np
import pytest

from ec2t_jax import export, report, tree_util
from ec2t_jax.training import train
from ec2t_jax.training import workdir as workdir_lib


def test_unknown_method(tiny_mnist):
  with pytest.raises(
    ValueError, match=r"unknown config.method 'bitnet'; valid: 'ec2t', 'absmean', 'twn'"
  ):
    train.validate_config(tiny_mnist(method='bitnet'))


def test_twn_refuses_pruning(tmp_path, tiny_mnist):
  config = tiny_mnist(method='twn', **{'ec2t.prune_pattern': 'fc1/kernel'})
  with pytest.raises(ValueError, match=r"config.method='twn' ternarizes only"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


@pytest.mark.slow
@pytest.mark.parametrize('method', ['twn', 'absmean', 'ec2t'])
def test_run_trains_exports_and_reports(tmp_path, tiny_mnist, method):
  workdir = str(tmp_path / 'run')
  summary = train.train_and_evaluate(tiny_mnist(method=method), workdir)
  assert summary['method'] == method
  assert (summary['gamma'] is None) == (method != 'ec2t')
  assert summary['ec2t/total_sparsity'] == pytest.approx(summary['sparsity'], abs=1e-6)
  run = workdir_lib.load_workdir(workdir)
  params = dict(tree_util.named_leaves(run.variables['params']))
  tern = tree_util.selected_names(run.ternary_mask)
  for name in tern:
    assert np.unique(np.asarray(params[name])).size <= 3
  assert export.ternary_leaves(run.variables, run.opt_state) == {f'params/{n}' for n in tern}
  data = report.load_run(workdir, method)
  assert sorted(s.name for s in data.layers) == sorted(tern)
  for s in data.layers:
    assert s.w_p > 0 and s.sparsity == pytest.approx(float(np.mean(s.assignment == 1)), abs=1e-6)
