"""Executes notebooks/colab_tpu.ipynb top to bottom on CPU with its smoke parameter."""

import os

import nbformat
import pytest

pytestmark = pytest.mark.slow  # Subprocesses or long runs: left out of `make test-fast`.

nbclient = pytest.importorskip('nbclient')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_colab_notebook_runs_in_smoke_mode(tmp_path):
  nb = nbformat.read(os.path.join(REPO, 'notebooks', 'colab_tpu.ipynb'), as_version=4)
  (params,) = [c for c in nb.cells if 'parameters' in c.get('metadata', {}).get('tags', [])]
  params.source += f'\nSMOKE = True\nWORKDIR = {str(tmp_path / "work")!r}\n'
  client = nbclient.NotebookClient(
    nb, timeout=900, kernel_name='python3', resources={'metadata': {'path': REPO}}
  )
  client.execute()
  outputs = ''.join(o.get('text', '') for c in nb.cells for o in c.get('outputs', []))
  assert 'test_accuracy' in outputs
  assert os.path.exists(tmp_path / 'work' / 'summary.json')
