"""One trained run, every tool: where two of them report a quantity, they report the same.

summary.json, `python -m ec2t_jax.scoring`, `python -m ec2t_jax.export` and report.md each
give per-layer sparsities or file sizes; this runs the real functions on one trained
workdir and compares what they print.
"""

import json
import os
import re

import pytest

from ec2t_jax import export, report
from ec2t_jax.report import markdown as report_markdown
from ec2t_jax.scoring import __main__ as scoring_cli


@pytest.fixture(scope='module')
def run_data(trained_workdir):
  return report.load_run(trained_workdir, 'run')


def _summary(workdir):
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def test_sparsity_of_summary_scoring_and_report_agree(trained_workdir, run_data, capsys):
  per_layer = _summary(trained_workdir)['per_layer_sparsity']
  assert per_layer
  # report.md's layer table.
  assert {layer.name: layer.sparsity for layer in run_data.layers} == per_layer
  text = report_markdown._markdown([run_data], {run_data.label: []})
  for name, value in per_layer.items():
    assert re.search(rf'\| {re.escape(name)} \| [\d,]+ \| {value:.1%} \|', text), name
  # The scoring table's `sparsity` column (both modes), and its JSON.
  for mode in ('corrected', 'reference'):
    assert scoring_cli.main(['--workdir', trained_workdir, '--mode', mode]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ['layer', 'kind', 'weights', 'sparsity']
    rows = {line.split()[0]: line.split() for line in lines[2:] if line.split()[0] in per_layer}
    assert set(rows) == set(per_layer)
    for name, value in per_layer.items():
      assert rows[name][3] == f'{100 * value:.1f}%', (mode, name, rows[name])
    cost = scoring_cli.score_workdir(trained_workdir, mode=mode)
    got = {r.name: r.kernel_sparsity for r in cost.layer_rows if r.name in per_layer}
    assert got == pytest.approx(per_layer, abs=1e-12)


def test_export_sizes_and_report_sizes_are_of_the_same_files(
  trained_workdir, run_data, tmp_path, capsys
):
  text = report_markdown._markdown([run_data], {run_data.label: []})
  row = next(  # The storage table's row.
    line
    for line in text.splitlines()
    if line.startswith(f'| {run_data.label} | ') and 'KiB' in line
  )
  for flags, key, label in (
    ([], 'packed', 'packed (mask + sign)'),
    (['--entropy-coding'], 'entropy_coded', 'entropy coded'),
  ):
    path = tmp_path / f'{key}.ec2t'
    assert export.main(['--workdir', trained_workdir, '--out', str(path), '--fp16', *flags]) == 0
    out = capsys.readouterr().out
    size = path.stat().st_size
    assert size == run_data.sizes[key]  # report.md's size is the file's, byte for byte.
    (line,) = [line for line in out.splitlines() if line.startswith(label)]
    printed_bytes, kib = re.search(r'([\d,]+) +([\d,.]+ KiB)', line[len(label) :]).groups()
    assert printed_bytes == f'{size:,d}' and f'| {kib} |' in row, (line, row)
    assert f'{size:,d} bytes = {kib})' in out
  assert f'| {run_data.sizes["float32"] / 1024:,.1f} KiB |' in row
