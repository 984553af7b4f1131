"""The runnable examples in examples/ work (short versions)."""

import importlib.util
import os


def _load(repo_root, name):
  path = os.path.join(repo_root, 'examples', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'example_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_nnx_mnist_smoke(repo_root, capsys):
  example = _load(repo_root, 'nnx_mnist')
  result = example.main(['--smoke'])
  assert result['levels'] == {'fc1': 3, 'fc2': 3}  # Exactly {-w_n, 0, +w_p}.
  assert 0.0 < result['sparsity'] < 1.0
  assert result['accuracy'] > 0.3  # Five FP steps already beat chance by far.
  assert 'ternary: test accuracy' in capsys.readouterr().out
