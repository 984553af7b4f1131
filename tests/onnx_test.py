"""Tests of `ec2t_jax.onnx_export`: onnxruntime reproduces `model.apply`, int8 ternary storage."""

import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ec2t_jax import export, models, tree_util

ort = pytest.importorskip('onnxruntime')
onnx_export = pytest.importorskip('ec2t_jax.onnx_export')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Normalization-like ops that must not remain after BatchNorm folding.
NORM_OPS = {
  'BatchNormalization',
  'InstanceNormalization',
  'LayerNormalization',
  'Sqrt',
  'Reciprocal',
}


class TinyViT(nn.Module):
  """A pre-LayerNorm ViT block: patches, class token, position embedding, attention, MLP."""

  dim: int = 16
  heads: int = 2
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.Conv(self.dim, (4, 4), strides=(4, 4), name='patch')(x)
    n = x.shape[0]
    x = x.reshape(n, -1, self.dim)
    cls = self.param('cls', nn.initializers.normal(1.0), (1, 1, self.dim))
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, self.dim)), x], axis=1)
    x = x + self.param('pos', nn.initializers.normal(0.5), (1, x.shape[1], self.dim))
    y = nn.LayerNorm(name='ln1')(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name='attn')(y, y)
    y = nn.LayerNorm(name='ln2')(x)
    y = nn.gelu(nn.Dense(2 * self.dim, name='mlp1')(y), approximate=True)
    y = nn.gelu(y, approximate=False)  # erf too.
    x = x + nn.Dense(self.dim, name='mlp2')(y)
    x = nn.LayerNorm(name='ln3')(x)[:, 0]
    x = jnp.concatenate([x, nn.avg_pool(jnp.ones_like(x)[:, None, :], (1, 1))[:, 0]], -1)
    return nn.Dense(self.num_classes, name='head')(jax.nn.softmax(x) * x)


def _variables(model, shape, is_ternary, seed=0):
  """Random variables of ``model`` (no init computation): ternary values, two random levels
  per leaf, for the selected kernels; non-trivial biases, scales and BatchNorm statistics."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))

  def make(path, leaf):
    name = tree_util.path_str(path)
    shape, dtype = leaf.shape, leaf.dtype
    if name.endswith('var'):
      return (0.5 + rng.random(shape)).astype(dtype)
    if name.endswith('scale'):
      return (1 + 0.1 * rng.normal(size=shape)).astype(dtype)
    if len(shape) <= 1:
      return (0.1 * rng.normal(size=shape)).astype(dtype)
    std = np.sqrt(2.0 / np.prod(shape[:-1]))
    if not is_ternary(name, leaf):
      return (std * rng.normal(size=shape)).astype(dtype)
    t = rng.choice([-1, 0, 1], size=shape, p=[0.3, 0.4, 0.3])
    w_p, w_n = std * (0.5 + rng.random(2))
    return np.where(t > 0, w_p, np.where(t < 0, -w_n, 0.0)).astype(dtype)

  return jax.tree_util.tree_map_with_path(make, abstract)


def _apply(model, variables, x):
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


def _middle(name, value):
  """Every params kernel of 2+ dimensions except the first and the last layer."""
  first_or_last = any(f'params/{k}/' in name for k in ('conv1', 'fc3', 'linear', 'patch', 'head'))
  return name.startswith('params/') and value.ndim >= 2 and not first_or_last


def _build(name, shape):
  if name == 'tiny_vit':
    model = TinyViT()
  else:
    model = models.create(name, num_classes=10)
  return model, _variables(model, shape, _middle)


def _session(proto):
  options = ort.SessionOptions()
  options.intra_op_num_threads = 1
  return ort.InferenceSession(
    proto.SerializeToString(), options, providers=['CPUExecutionProvider']
  )


def _compare(got, ref):
  scale = float(np.max(np.abs(ref)))
  assert scale > 1e-3  # Non-trivial logits.
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * scale)
  np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


CASES = [('lenet5', (28, 28, 1)), ('resnet20', (32, 32, 3)), ('tiny_vit', (16, 16, 3))]


@pytest.fixture(scope='module', params=CASES, ids=[c[0] for c in CASES])
def exported(request):
  name, shape = request.param
  model, variables = _build(name, shape)
  return name, shape, model, variables, onnx_export.to_onnx(model, variables, shape)


@pytest.mark.parametrize('batch', [1, 128])
def test_onnxruntime_matches_model_apply(exported, batch):
  name, shape, model, variables, proto = exported
  x = np.random.default_rng(batch).normal(size=(batch, *shape)).astype(np.float32)
  got = _session(proto).run(None, {'images': x})[0]
  ref = _apply(model, variables, x)
  assert got.shape == ref.shape == (batch, 10)
  _compare(got, ref)


def test_ternary_kernels_are_int8_initializers(exported):
  name, _, _, variables, proto = exported
  expected = sorted(export.ternary_leaves(variables))
  assert expected and onnx_export.ternary_initializers(proto) == expected
  props = {p.key: json.loads(p.value) for p in proto.metadata_props}
  assert props['ec2t_jax.ternary_leaves'] == expected
  inits = {i.name: i for i in proto.graph.initializer}
  flat = tree_util.flat_dict(variables)
  for leaf in expected:
    t = onnx_export.numpy_helper.to_array(inits[f'{leaf}:int8'])
    assert t.dtype == np.int8
    np.testing.assert_array_equal(t, np.sign(flat[leaf]))
    assert leaf not in inits  # No float copy of a ternary kernel.
  large_floats = [i.name for i in inits.values() if i.data_type == 1 and np.prod(i.dims) > 1000]
  if name == 'resnet20':  # The float first conv (432) and classifier (640) are smaller.
    assert large_floats == []


def test_resnet20_batch_norm_is_folded(exported):
  name, _, _, _, proto = exported
  ops = {n.op_type for n in proto.graph.node}
  props = {p.key: json.loads(p.value) for p in proto.metadata_props}
  if name == 'resnet20':
    assert not ops & NORM_OPS
    assert len(props['ec2t_jax.folded_batch_norms']) == 19  # conv1 + 2 per block.
    names = {i.name for i in proto.graph.initializer}
    assert not any(n.startswith('batch_stats/') for n in names)
  else:
    assert props['ec2t_jax.folded_batch_norms'] == []


def test_input_has_a_symbolic_batch(exported):
  _, shape, _, _, proto = exported
  dims = proto.graph.input[0].type.tensor_type.shape.dim
  assert dims[0].dim_param == 'batch' and [d.dim_value for d in dims[1:]] == list(shape)


def test_conv_output_read_twice_is_not_folded():
  class Shared(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      y = nn.Conv(4, (3, 3), name='conv')(x)
      z = nn.BatchNorm(use_running_average=not train, name='bn')(y)
      return jnp.mean(z + y, axis=(1, 2))

  model = Shared()
  variables = _variables(model, (8, 8, 3), _middle)
  assert onnx_export.folded_batch_norms(model, variables, (8, 8, 3)) == []
  proto = onnx_export.to_onnx(model, variables, (8, 8, 3))
  x = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype(np.float32)
  got = _session(proto).run(None, {'images': x})[0]
  _compare(got, _apply(model, variables, x))


def test_errors_name_the_bad_value():
  model, variables = _build('lenet5', (28, 28, 1))
  with pytest.raises(ValueError, match='opset must be in'):
    onnx_export.to_onnx(model, variables, (28, 28, 1), opset=9)
  with pytest.raises(ValueError, match="'params/fc1/bias' does not hold"):
    onnx_export.to_onnx(model, variables, (28, 28, 1), ternary_leaves=['params/fc1/bias'])
  with pytest.raises(ValueError, match="'params/nope' is not a leaf"):
    onnx_export.to_onnx(model, variables, (28, 28, 1), ternary_leaves=['params/nope'])

  class Sorts(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return jnp.sort(x, axis=-1)

  with pytest.raises(NotImplementedError, match="primitive 'sort'"):
    onnx_export.to_onnx(Sorts(), {}, (4,))


class _Fn(nn.Module):
  """``fn(x)`` as a linen module without variables."""

  fn: Any

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return self.fn(x)


def test_computation_that_depends_on_the_batch_size_raises():
  # The mean over the batch divides by 2 in one trace and by 3 in the other: exporting it
  # would freeze the divisor at 2.
  with pytest.raises(NotImplementedError, match=r'div depends on the batch size: 2\.0'):
    onnx_export.to_onnx(_Fn(lambda x: x - x.mean(0)), {}, (4,))
  # A mean over the features does not depend on the batch.
  proto = onnx_export.to_onnx(_Fn(lambda x: x - x.mean(-1, keepdims=True)), {}, (4,))
  x = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
  np.testing.assert_allclose(
    _session(proto).run(None, {'images': x})[0], x - x.mean(-1, keepdims=True), atol=1e-5
  )


@pytest.mark.parametrize(
  'fn', [lambda x: x[:1], lambda x: x[1:], lambda x: x[::2]], ids=['head', 'tail', 'step']
)
def test_slicing_the_batch_raises(fn):
  with pytest.raises(NotImplementedError, match='batch'):
    onnx_export.to_onnx(_Fn(fn), {}, (4,))


def test_batch_norm_folding_with_conv_bias_and_without_scale_or_bias():
  class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Conv(6, (3, 3), use_bias=True, name='conv_a')(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, name='bn_a')(x))
      x = nn.Conv(5, (3, 3), use_bias=True, name='conv_b')(x)
      x = nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False, name='bn_b')(
        x
      )
      return nn.Dense(10, name='head')(nn.relu(x).reshape(x.shape[0], -1))

  model, shape = ConvBN(), (6, 6, 2)
  variables = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, *shape))))
  rng = np.random.default_rng(1)
  stats = variables['batch_stats']
  for name in ('bn_a', 'bn_b'):  # Running statistics far from (0, 1), set by hand.
    n = stats[name]['mean'].shape
    stats[name]['mean'] = rng.normal(0.5, 1.0, n).astype(np.float32)
    stats[name]['var'] = rng.uniform(0.2, 3.0, n).astype(np.float32)
  for name in ('conv_a', 'conv_b'):  # Non-zero conv biases.
    bias = variables['params'][name]['bias']
    variables['params'][name]['bias'] = rng.normal(0, 0.5, bias.shape).astype(np.float32)
  bn = variables['params']['bn_a']
  bn['scale'] = rng.uniform(0.5, 2.0, bn['scale'].shape).astype(np.float32)
  bn['bias'] = rng.normal(0, 0.5, bn['bias'].shape).astype(np.float32)
  assert 'bn_b' not in variables['params']

  folds = onnx_export.folded_batch_norms(model, variables, shape)
  assert [(f.conv, f.norm) for f in folds] == [('conv_a', 'bn_a'), ('conv_b', 'bn_b')]
  proto = onnx_export.to_onnx(model, variables, shape)
  assert not {n.op_type for n in proto.graph.node} & NORM_OPS
  props = {p.key: json.loads(p.value) for p in proto.metadata_props}
  assert props['ec2t_jax.folded_batch_norms'] == [['conv_a', 'bn_a'], ['conv_b', 'bn_b']]
  x = np.random.default_rng(2).normal(size=(5, *shape)).astype(np.float32)
  _compare(_session(proto).run(None, {'images': x})[0], _apply(model, variables, x))


def test_only_float32_is_exported():
  class Dense(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(3, dtype=self.dtype, name='fc')(x)

  variables = jax.device_get(Dense().init(jax.random.key(0), jnp.zeros((1, 4))))
  with pytest.raises(ValueError, match=r'computes \w+ in bfloat16.*dtype=jnp\.float32'):
    onnx_export.to_onnx(Dense(dtype=jnp.bfloat16), variables, (4,))
  half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), variables)
  with pytest.raises(ValueError, match=r"'params/fc/bias' is bfloat16 \(2 floating leaves"):
    onnx_export.to_onnx(Dense(), half, (4,))
  # The remedy the message gives exports.
  back = jax.tree.map(lambda a: a.astype(jnp.float32), half)
  proto = onnx_export.to_onnx(Dense(dtype=jnp.float32), back, (4,))
  x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
  _compare(_session(proto).run(None, {'images': x})[0], _apply(Dense(), back, x))


@pytest.mark.parametrize('opset', range(onnx_export.MIN_OPSET, onnx_export.MAX_OPSET + 1))
def test_opsets(opset):
  model, variables = _build('tiny_vit', (16, 16, 3))
  proto = onnx_export.to_onnx(model, variables, (16, 16, 3), opset=opset)
  x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  _compare(_session(proto).run(None, {'images': x})[0], _apply(model, variables, x))


@pytest.mark.slow
def test_cli_exports_a_trained_workdir(trained_workdir, tmp_path, capsys):
  from ec2t_jax.training import datasets
  from ec2t_jax.training import workdir as workdir_lib

  out = str(tmp_path / 'lenet5.onnx')
  assert export.main(['--workdir', trained_workdir, '--format', 'onnx', '--out', out]) == 0
  text = capsys.readouterr().out
  run = workdir_lib.load_workdir(trained_workdir)
  tern = export.ternary_leaves(run.variables, run.opt_state)
  assert (
    f'{len(tern)} ternary kernels stored as int8' in text
    and f'{os.path.getsize(out):,d} bytes' in text
  )
  import onnx

  proto = onnx.load(out)
  assert onnx_export.ternary_initializers(proto) == sorted(tern) and tern
  props = {p.key: json.loads(p.value) for p in proto.metadata_props}
  assert props['ec2t_jax.model']['name'] == 'lenet5'
  images, _ = datasets.load_embedded_mnist()['test']  # The whole test set: 10,000 images.
  x = (np.asarray(images, np.float32) / 255.0).reshape(-1, 28, 28, 1)
  got = _session(proto).run(None, {'images': x})[0]
  mean, std = (np.asarray(a, np.float32) for a in run.normalization)
  _compare(got, _apply(run.model, run.variables, (x - mean) / std))


@pytest.mark.parametrize('flag', ['--entropy-coding', '--fp16', '--fp16-centroids'])
def test_cli_refuses_ec2t_only_flags_with_onnx(flag, tmp_path, capsys):
  out = str(tmp_path / 'net.onnx')
  assert export.main(['--workdir', str(tmp_path), '--format', 'onnx', '--out', out, flag]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and f'error: {flag} applies to --format ec2t only' in err
  assert not os.path.exists(out)


def test_cli_reports_an_invalid_model_in_one_line(trained_workdir, tmp_path, capsys, monkeypatch):
  import onnx

  def invalid(*args, **kwargs):
    raise onnx.checker.ValidationError('Field "shape" of "type" is required\nbut not set')

  monkeypatch.setattr(onnx_export, 'to_onnx', invalid)
  out = str(tmp_path / 'net.onnx')
  assert export.main(['--workdir', trained_workdir, '--format', 'onnx', '--out', out]) == 2
  err = capsys.readouterr().err
  assert err == 'error: Field "shape" of "type" is required but not set\n'


def test_cli_without_onnx_says_which_extra(monkeypatch, tmp_path, capsys):
  import ec2t_jax

  monkeypatch.setitem(sys.modules, 'ec2t_jax.onnx_export', None)  # import raises ImportError.
  monkeypatch.delattr(ec2t_jax, 'onnx_export')
  out = str(tmp_path / 'net.onnx')
  assert export.main(['--workdir', str(tmp_path), '--format', 'onnx', '--out', out]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and "pip install 'ec2t_jax[onnx]'" in err


def test_zoo_vit():
  model = models.create('vit_tiny', num_classes=10)
  variables = _variables(model, (28, 28, 1), _middle)
  proto = onnx_export.to_onnx(model, variables, (28, 28, 1))
  assert onnx_export.ternary_initializers(proto) == sorted(export.ternary_leaves(variables))
  session = _session(proto)
  for batch in (1, 128):
    x = np.random.default_rng(batch).normal(size=(batch, 28, 28, 1)).astype(np.float32)
    _compare(session.run(None, {'images': x})[0], _apply(model, variables, x))


@pytest.mark.slow
def test_latency_bench_smoke(tmp_path, monkeypatch, capsys):
  import importlib.util

  # The script sets XLA_FLAGS for its own process if unset; keep this session's as they are.
  monkeypatch.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', ''))
  spec = importlib.util.spec_from_file_location(
    'onnx_latency', os.path.join(REPO, 'bench', 'onnx_latency.py')
  )
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  out = tmp_path / 'onnx.json'
  assert bench.main(['--models', 'lenet5', '--smoke', '--json', str(out)]) == 0
  (result,) = json.loads(out.read_text())['results']
  assert result['ternary_kernels'] == 3  # conv2, fc1, fc2.
  assert result['onnx_bytes'] < result['float32_bytes'] / 2
  assert 0 < result['ec2t_entropy_coded_bytes'] < result['onnx_bytes']
  for row in result['latency']:
    assert row['same_argmax'] and row['max_rel_logit_error'] < 1e-4
    assert row['onnxruntime_ms'] > 0 and row['jax_ms'] > 0
  assert '| lenet5 |' in capsys.readouterr().out
