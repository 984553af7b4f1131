"""Tests for ec2t_jax.models.pytorch: PyTorch parity, round trips, mismatch errors."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ec2t_jax import models
from ec2t_jax.models import pytorch as convert

try:
  import torch
  import torch_models
except ImportError:  # torch is an optional extra.
  torch = None

requires_torch = pytest.mark.skipif(
  torch is None, reason="PyTorch not installed (optional extra: pip install 'ec2t_jax[torch]')"
)


def _random_variables(name, num_classes=10, seed=0, **kw):
  """Random values for every variable of a model (BN variances positive), without init."""
  model = models.create(name, num_classes=num_classes, **kw)
  x = jax.ShapeDtypeStruct((1, *models.input_shape(name)), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    value = rng.standard_normal(leaf.shape).astype(leaf.dtype)
    return np.abs(value) + 0.5 if path[-1].key == 'var' else value

  return jax.tree.map_with_path(fill, shapes)


# ---------------------------------------------------------------------------
# Without torch: numpy state_dicts.


def test_numpy_round_trip_resnet20():
  variables = _random_variables('resnet20')
  sd = convert.to_pytorch(variables, 'resnet20')
  assert sd['conv1.weight'].shape == (16, 3, 3, 3)
  assert sd['layer2.0.bn1.running_var'].shape == (32,)
  assert sd['layer2.0.bn1.num_batches_tracked'].dtype == np.int64
  assert sd['linear.weight'].shape == (10, 64)
  back = convert.from_pytorch(sd, 'resnet20')
  jax.tree.map(np.testing.assert_array_equal, back, variables)


def test_lenet_round_trip_has_empty_batch_stats_and_permutes_fc1():
  variables = _random_variables('lenet5')
  sd = convert.to_pytorch(variables, 'lenet5')
  # Flax row (h, w, c) = (1, 2, 3) is PyTorch column c·25 + h·5 + w.
  flax_row = (1 * 5 + 2) * 16 + 3
  np.testing.assert_array_equal(
    sd['fc1.weight'][:, 3 * 25 + 1 * 5 + 2], variables['params']['fc1']['kernel'][flax_row]
  )
  back = convert.from_pytorch(sd, 'lenet5')
  assert back['batch_stats'] == {}
  jax.tree.map(np.testing.assert_array_equal, back['params'], variables['params'])


def test_module_prefix_stripped_and_num_classes_inferred():
  variables = _random_variables('resnet20', num_classes=7)
  sd = {'module.' + k: v for k, v in convert.to_pytorch(variables, 'resnet20').items()}
  back = convert.from_pytorch(sd, 'resnet20')
  assert back['params']['linear']['kernel'].shape == (64, 7)


def test_micronet_names():
  variables = _random_variables('micronet', depth_mult=0.25, width_mult=0.5)
  sd = convert.to_pytorch(variables, 'micronet')
  assert 'layer2.0.shortcut.0.weight' in sd
  assert 'layer2.0.shortcut.1.running_mean' in sd
  assert 'layer1.1.bn3.weight' in sd
  assert not any('shortcut' in k for k in sd if k.startswith('layer1.'))


def test_mismatch_raises_one_error_listing_every_problem():
  variables = _random_variables('resnet20')
  sd = convert.to_pytorch(variables, 'resnet20')
  del sd['layer1.0.conv1.weight']
  sd['layer9.0.conv1.weight'] = np.zeros((3, 3))
  sd['layer3.2.bn2.bias'] = np.zeros(63)
  with pytest.raises(ValueError) as info:
    convert.from_pytorch(sd, 'resnet20')
  msg = str(info.value)
  assert 'missing (1)' in msg and 'layer1.0.conv1.weight: expected shape (16, 16, 3, 3)' in msg
  assert 'unexpected (1)' in msg and 'layer9.0.conv1.weight: shape (3, 3)' in msg
  assert 'wrong shape (1)' in msg and 'layer3.2.bn2.bias: expected (64,), found (63,)' in msg


def test_mismatch_with_the_wrong_depth_lists_a_bounded_number_of_names():
  variables = _random_variables('resnet32')
  sd = convert.to_pytorch(variables, 'resnet32')
  with pytest.raises(ValueError, match=r'unexpected \(\d+\):[\s\S]*\.\.\. and \d+ more'):
    convert.from_pytorch(sd, 'resnet20')


def test_unknown_model_lists_supported():
  with pytest.raises(ValueError, match=r"cannot convert model 'vgg16'.*'resnet20'"):
    convert.from_pytorch({}, 'vgg16')
  with pytest.raises(ValueError, match='supported models'):
    convert.to_pytorch({'params': {}}, 'resnet21')
  assert 'efficientnet_b7' in convert.supported_models()


def test_path_without_torch_raises_import_error(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now fails.
  with pytest.raises(ImportError, match=r'ec2t_jax\[torch\]'):
    convert.from_pytorch(tmp_path / 'model.pt', 'resnet20')


# ---------------------------------------------------------------------------
# PyTorch parity.


def _parity(torch_model, name, hw, num_classes=10, channels=3, **model_kwargs):
  """Max |Δlogit| / max |logit| between PyTorch and the converted Flax model."""
  torch_models.randomize_(torch_model)
  sd = torch_model.state_dict()
  variables = convert.from_pytorch(sd, name, **model_kwargs)
  x = np.random.default_rng(0).standard_normal((4, channels, hw, hw)).astype(np.float32)
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(x)).numpy()
  model = models.create(name, num_classes=num_classes, **model_kwargs)
  got = np.asarray(model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), train=False))
  scale = np.abs(expected).max()
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * scale)
  # Round trip back to PyTorch, bit for bit, and loadable with strict=True.
  sd_back = convert.to_pytorch(variables, name)
  assert sd_back.keys() == sd.keys()
  for k, v in sd.items():
    np.testing.assert_array_equal(sd_back[k], v.numpy(), err_msg=k)
  torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in sd_back.items()})
  return float(np.abs(got - expected).max() / scale)


@requires_torch
def test_parity_lenet5():
  err = _parity(torch_models.LeNet5(10), 'lenet5', 28, channels=1)
  print(f'lenet5 max rel err {err:.2e}')


@requires_torch
def test_parity_resnet20():
  err = _parity(torch_models.CifarResNet(20, 10), 'resnet20', 32)
  print(f'resnet20 max rel err {err:.2e}')


@requires_torch
def test_parity_micronet():
  kw = dict(depth_mult=0.25, width_mult=0.6)
  torch_model = torch_models.MicroNet(num_classes=100, **kw)
  err = _parity(torch_model, 'micronet', 32, num_classes=100, **kw)
  print(f'micronet max rel err {err:.2e}')


@requires_torch
def test_parity_resnet18():
  err = _parity(torch_models.ResNet(18, 10), 'resnet18', 64)
  print(f'resnet18 max rel err {err:.2e}')


@requires_torch
@pytest.mark.parametrize('same_padding', [False, True])
def test_parity_efficientnet_b0(same_padding):
  torch_model = torch_models.EfficientNet('efficientnet_b0', 10, same_padding=same_padding)
  err = _parity(torch_model, 'efficientnet_b0', 64, same_padding=same_padding)
  print(f'efficientnet_b0 same_padding={same_padding} max rel err {err:.2e}')


@requires_torch
@pytest.mark.parametrize(
  'name, make',
  [
    ('resnet50', lambda: torch_models.ResNet(50, 10)),
    ('efficientnet_b1', lambda: torch_models.EfficientNet('efficientnet_b1', 10)),
  ],
)
def test_names_and_shapes_match_bigger_models(name, make):
  sd = make().state_dict()
  variables = convert.from_pytorch(sd, name)
  sd_back = convert.to_pytorch(variables, name)
  assert sd_back.keys() == sd.keys()
  assert all(sd_back[k].shape == tuple(v.shape) for k, v in sd.items())


@requires_torch
def test_load_from_path_with_wrapper(tmp_path):
  torch_model = torch_models.randomize_(torch_models.CifarResNet(20, 10))
  path = tmp_path / 'resnet20.pth'
  torch.save({'state_dict': torch_model.state_dict(), 'epoch': 3}, path)
  variables = convert.from_pytorch(str(path), 'resnet20')
  np.testing.assert_array_equal(
    variables['batch_stats']['bn1']['var'], torch_model.bn1.running_var.numpy()
  )


@requires_torch
def test_bfloat16_tensors_are_accepted():
  torch_model = torch_models.CifarResNet(20, 10).to(torch.bfloat16)
  variables = convert.from_pytorch(torch_model.state_dict(), 'resnet20')
  assert variables['params']['conv1']['kernel'].dtype == jnp.float32
