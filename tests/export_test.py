"""Tests of `ec2t_jax.export`: bit-exact round trips, entropy coding, corrupted files, CLI."""

import hashlib
import json
import math
import os
import struct

import jax
import numpy as np
import pytest

from ec2t_jax import export, tree_util
from ec2t_jax.training import datasets
from ec2t_jax.training import workdir as workdir_lib


@pytest.fixture(scope='module')
def run(trained_workdir):
  return workdir_lib.load_workdir(trained_workdir)


def _leaves(tree):
  return {name: np.asarray(v) for name, v in tree_util.named_leaves(tree)}


def _bits(a):
  return np.asarray(a).view(np.uint8)


@pytest.mark.parametrize('entropy_coding', [False, True])
def test_round_trip_is_bit_identical(run, tmp_path, entropy_coding):
  path = str(tmp_path / 'net.ec2t')
  stats = export.save(path, run.variables, run.opt_state, entropy_coding=entropy_coding)
  loaded = export.load(path)
  assert set(loaded) == {'params', 'batch_stats'}
  orig, got = _leaves(run.variables), _leaves(loaded)
  assert set(orig) == set(got)
  for name in orig:
    assert got[name].dtype == orig[name].dtype and got[name].shape == orig[name].shape
    np.testing.assert_array_equal(_bits(got[name]), _bits(orig[name]), err_msg=name)
  assert stats.ternary_leaves == 4  # conv1, conv2, fc1, fc2 of LeNet-5 (fc3 stays FP).
  assert stats.total_bytes == (tmp_path / 'net.ec2t').stat().st_size


def test_ternary_leaves_from_state_or_values(run):
  from_state = export.ternary_leaves(run.variables, run.opt_state)
  from_values = export.ternary_leaves(run.variables)
  assert (
    from_state == from_values == {f'params/{n}/kernel' for n in ('conv1', 'conv2', 'fc1', 'fc2')}
  )
  # -0.0 would not survive the sign bits, so such a leaf is not packed as ternary.
  neg_zero = {'params': {'k': np.array([[0.5, -0.0], [-0.25, 0.5]], np.float32)}}
  assert export.ternary_leaves(neg_zero) == set()


def test_float16_centroids_and_leaves_tolerance(run):
  data, _ = export.dumps(run.variables, run.opt_state, fp_dtype='float16', centroid_dtype='float16')
  got = _leaves(export.loads(data))
  tern = export.ternary_leaves(run.variables, run.opt_state)
  for name, orig in _leaves(run.variables).items():
    err = np.abs(got[name].astype(np.float64) - orig)
    # float16 keeps 11 significant bits: relative error <= 2^-11 (plus its subnormal floor).
    np.testing.assert_array_less(err, np.abs(orig) * 2.0**-11 + 2.0**-24 + 1e-30, err_msg=name)
    if name in tern:  # Still ternary, zeros exact.
      assert np.array_equal(got[name] == 0, orig == 0)
      assert tree_util.ternary_levels(got[name]) is not None


def test_entropy_coding_is_within_two_percent_of_the_entropy(run):
  _, stats = export.dumps(run.variables, run.opt_state, entropy_coding=True)
  assert stats.ternary_payload_bits <= 1.02 * stats.entropy_bound_bits
  _, packed = export.dumps(run.variables, run.opt_state)
  tern = export.ternary_leaves(run.variables, run.opt_state)
  nnz = sum(int(np.count_nonzero(v)) for n, v in _leaves(run.variables).items() if n in tern)
  # Packed: one mask bit per weight and one sign bit per non-zero (bytes rounded up per leaf).
  assert stats.num_ternary + nnz <= packed.ternary_payload_bits <= stats.num_ternary + nnz + 64


@pytest.mark.parametrize('sparsity', [0.452, 0.733, 0.95])
def test_entropy_coding_on_a_ternary_resnet20(
  sparsity, abstract_variables, synthetic_variables, is_body_conv
):
  _, shapes = abstract_variables('resnet20', 10)
  variables = synthetic_variables(shapes, sparsity, is_body_conv)
  data, stats = export.dumps(variables, entropy_coding=True, fp_dtype='float16')
  assert stats.ternary_leaves == 18
  assert stats.ternary_payload_bits <= 1.02 * stats.entropy_bound_bits
  expected = -(
    sparsity * math.log2(sparsity) + 2 * (1 - sparsity) / 2 * math.log2((1 - sparsity) / 2)
  )
  assert stats.entropy_bound_bits == pytest.approx(stats.num_ternary * expected, rel=1e-3)
  got = _leaves(export.loads(data))
  for name, orig in _leaves(variables).items():
    if is_body_conv(name):
      np.testing.assert_array_equal(got[name], orig)


def test_sparse_full_precision_leaf_and_bfloat16():
  rng = np.random.default_rng(0)
  pruned = rng.standard_normal((64, 32)).astype(np.float32)
  pruned[rng.random(pruned.shape) < 0.9] = 0.0  # An ECP-like pruned layer: not ternary.
  bf16 = np.asarray(jax.numpy.asarray([[0.5, 0.0], [-0.25, 0.5]], jax.numpy.bfloat16))
  variables = {'params': {'pruned': pruned, 'tern_bf16': bf16, 'step': np.int32(7)}}
  data, stats = export.dumps(variables)
  assert stats.fp_bytes < pruned.nbytes / 4
  got = export.loads(data)['params']
  np.testing.assert_array_equal(got['pruned'], pruned)
  assert got['tern_bf16'].dtype == bf16.dtype
  np.testing.assert_array_equal(_bits(got['tern_bf16']), _bits(bf16))
  assert got['step'] == 7 and got['step'].dtype == np.int32


@pytest.fixture(scope='module')
def good(run):
  return export.dumps(run.variables, run.opt_state, entropy_coding=True)[0]


def test_truncated_files_raise(good):
  for cut in (0, 5, 23, 100, len(good) // 2, len(good) - 33, len(good) - 1):
    with pytest.raises(ValueError, match='not an ec2t_jax export|truncated'):
      export.loads(good[:cut])
  with pytest.raises(ValueError, match='trailing bytes'):
    export.loads(good + b'\0')


def test_flipped_bytes_raise(good):
  for pos in (12, 30, 400, len(good) // 2, len(good) - 40, len(good) - 1):
    bad = bytearray(good)
    bad[pos] ^= 0x10
    with pytest.raises(ValueError):
      export.loads(bytes(bad))


def test_wrong_magic_and_version(good):
  with pytest.raises(ValueError, match="magic b'EC2TPACX', expected b'EC2TPACK'"):
    export.loads(b'EC2TPACX' + good[8:])
  bad = bytearray(good)
  bad[8:10] = struct.pack('<H', 99)
  with pytest.raises(ValueError, match='unsupported export version 99'):
    export.loads(bytes(bad))
  with pytest.raises(ValueError, match='not an ec2t_jax export'):
    export.loads(b'PK\x03\x04' + bytes(100))


def _rewrite_manifest(data, edit):
  """A file whose manifest was edited and whose checksum was recomputed (a buggy writer)."""
  magic, version, flags, m_len, p_len = struct.unpack_from('<8sHHIQ', data)
  manifest = json.loads(data[24 : 24 + m_len])
  edit(manifest)
  m = json.dumps(manifest).encode()
  body = struct.pack('<8sHHIQ', magic, version, flags, len(m), p_len) + m + data[24 + m_len : -32]
  return body + hashlib.sha256(body).digest()


def test_inconsistent_manifest_raises_even_with_a_valid_checksum(run):
  data, _ = export.dumps(run.variables, run.opt_state)

  def outside(m):
    m['entries'][0]['values'] = [10**9, 4]

  def counts(m):
    e = next(e for e in m['entries'] if e['kind'] == 'ternary')
    e['counts'] = [e['counts'][0] + 1, e['counts'][1] - 1, e['counts'][2]]

  def kind(m):
    m['entries'][0]['kind'] = 'zip'

  for edit, message in (
    (outside, 'points outside the payload'),
    (counts, 'non-zeros|disagree'),
    (kind, "kind 'zip'"),
  ):
    with pytest.raises(ValueError, match=message):
      export.loads(_rewrite_manifest(data, edit))


def test_bad_dtype_options(run):
  with pytest.raises(ValueError, match="fp_dtype must be one of \\['float16', 'float32'\\]"):
    export.dumps(run.variables, fp_dtype='bfloat16')
  with pytest.raises(ValueError, match='centroid_dtype'):
    export.dumps(run.variables, centroid_dtype='int8')
  with pytest.raises(ValueError, match='nested mapping'):
    export.dumps([1, 2])


def test_cli_prints_sizes(trained_workdir, tmp_path, capsys):
  workdir = trained_workdir
  out = tmp_path / 'lenet.ec2t'
  assert export.main(['--workdir', workdir, '--out', str(out), '--entropy-coding', '--fp16']) == 0
  text = capsys.readouterr().out
  for label in ('float32 checkpoint', 'packed (mask + sign)', 'entropy coded', 'sum N*H(P)'):
    assert label in text
  assert out.stat().st_size > 0 and 'params' in export.load(str(out))


@pytest.mark.parametrize(
  'where, message', [('dir', 'is a directory'), ('missing', 'does not exist')]
)
def test_cli_refuses_a_bad_out_path_before_the_work(tmp_path, capsys, where, message):
  bad = tmp_path if where == 'dir' else tmp_path / 'missing' / 'net.ec2t'
  assert export.main(['--workdir', str(tmp_path / 'nothing'), '--out', str(bad)]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: --out') and message in err and err.count('\n') == 1


def test_keys_must_be_strings_without_slashes():
  with pytest.raises(ValueError, match='keys must be strings, got 1 at params'):
    export.dumps({'params': {1: np.zeros(2)}})
  with pytest.raises(ValueError, match='must not contain "/"'):
    export.dumps({'params': {'a/b': np.zeros(2)}})


def test_file_records_its_network_and_reproduces_test_accuracy(trained_workdir, tmp_path):
  path = str(tmp_path / 'tiny.ec2t')
  assert export.main(['--workdir', trained_workdir, '--out', path, '--entropy-coding']) == 0
  info = export.model_info(path)
  assert info['name'] == 'lenet5' and info['num_classes'] == 10
  assert info['input_shape'] == [28, 28, 1] and info['dataset'] == 'mnist'
  assert info['normalization'] == [[0.1307], [0.3081]]
  predict = export.load_predictor(path)
  images, labels = datasets.load_embedded_mnist()['test']
  with open(os.path.join(trained_workdir, 'summary.json')) as f:
    summary = json.load(f)
  n = 128  # The tiny run evaluates num_eval_examples=128 test images.
  accuracy = float(np.mean(np.argmax(predict(images[:n]), -1) == labels[:n]))
  assert accuracy == summary['test_accuracy']


def test_files_without_model_info_still_load_but_have_no_predictor(trained_workdir, tmp_path):
  run = workdir_lib.load_workdir(trained_workdir)
  path = str(tmp_path / 'plain.ec2t')
  export.save(path, run.variables, run.opt_state)
  assert export.model_info(path) is None
  assert export.load(path)['params']['fc1']['kernel'].shape == (400, 120)
  with pytest.raises(ValueError, match='records no model'):
    export.load_predictor(path)
  with pytest.raises(ValueError, match='unknown model info keys'):
    export.save(path, run.variables, model={'name': 'lenet5', 'colour': 'red'})
