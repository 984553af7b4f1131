"""The runnable examples in examples/ work (short versions)."""

import importlib.util
import os

import pytest


def _load(repo_root, name):
  path = os.path.join(repo_root, 'examples', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'example_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_nnx_mnist_smoke(repo_root, capsys):
  example = _load(repo_root, 'nnx_mnist')
  result = example.main(['--smoke'])
  assert result['levels'] == {'fc1': 3, 'fc2': 3}  # Exactly {-w_n, 0, +w_p}.
  assert 0.0 < result['sparsity'] < 1.0
  assert result['accuracy'] > 0.3  # Five FP steps already beat chance by far.
  assert 'ternary: test accuracy' in capsys.readouterr().out


def test_make_npz_reads_mnist_format_idx_files(repo_root, tmp_path):
  import gzip

  import numpy as np
  import pytest

  example = _load(repo_root, 'make_npz')
  rng = np.random.default_rng(0)
  arrays = {
    'x_train': rng.integers(0, 256, (5, 4, 3), dtype=np.uint8),
    'y_train': rng.integers(0, 10, (5,), dtype=np.uint8),
    'x_test': rng.integers(0, 256, (2, 4, 3), dtype=np.uint8),
    'y_test': rng.integers(0, 10, (2,), dtype=np.uint8),
  }
  for key, name in example.IDX_FILES.items():
    a = arrays[key]
    header = bytes([0, 0, 8, a.ndim]) + b''.join(d.to_bytes(4, 'big') for d in a.shape)
    with gzip.open(tmp_path / name, 'wb') as f:
      f.write(header + a.tobytes())
  out = tmp_path / 'data.npz'
  example.main([str(out), '--idx', str(tmp_path)])
  with np.load(out) as got:
    for key, a in arrays.items():
      np.testing.assert_array_equal(got[key], a)
  with gzip.open(tmp_path / 'bad.gz', 'wb') as f:
    f.write(b'\x12\x34\x56\x78')
  with pytest.raises(ValueError, match='is not an idx file of unsigned bytes'):
    example.read_idx(str(tmp_path / 'bad.gz'))
