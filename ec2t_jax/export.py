"""A compact, self-describing file format for trained EC2T networks.

EC2T (Marban, Becking, Wiedemann & Samek, CVPR Workshops 2020, arXiv
2004.01077, §3 and docs/algorithm.md §11) stores a ternary layer as one sparsity mask, one
sign bit per non-zero weight and its two centroid values, and notes that
entropy coding shrinks it further towards ``N·H(P)`` bits, ``H(P)`` being the
entropy of the layer's cluster probabilities ``P = (P_n, P_0, P_p)``. This
module writes and reads exactly that:

* a ternary leaf (recognized from the EC2T optimizer state through
  `ec2t_jax.compressed_kernels`, or, without a state, from its values
  ``{-w_n, 0, +w_p}``) is stored as ``np.packbits`` of its sparsity mask, the
  packed signs of its non-zeros in C order, and ``[w_p, w_n]`` in
  ``centroid_dtype``; with ``entropy_coding=True`` the symbols of all ternary
  leaves go through one range coder (`constriction`), each leaf with its own
  categorical model built from its exact symbol counts;
* every other leaf (biases, BatchNorm, the full-precision first/last layers)
  is stored in ``fp_dtype``, as a mask plus its non-zeros when that is smaller.

File layout (little endian)::

    magic b'EC2TPACK' | u16 version | u16 flags | u32 manifest bytes | u64 payload bytes
    manifest (UTF-8 JSON: one entry per leaf with path, kind, shape, dtype, offsets)
    payload
    sha256 of everything above (32 bytes)

`load` checks the magic, the version, the length and the checksum before it
decodes anything, and every entry against the payload after, so a truncated,
corrupted or foreign file raises a `ValueError` instead of returning wrong
weights.

Precision: with ``centroid_dtype='float32'`` (the default) a loaded ternary
leaf is bit-identical to the trained one. ``'float16'`` rounds each layer's
two levels to 11 significant bits: every weight of the layer moves by at most
``2^-11`` of its magnitude (0.05 %), and since the error is one scale factor
per sign group, the layer's output changes by the same relative amount.
``fp_dtype='float16'`` rounds the full-precision leaves likewise: every value
moves by at most ``2^-11`` of its leaf's largest magnitude. A leaf that
float16 cannot hold that closely (a value beyond its range, 65504, or a leaf
of values so small that they would flush to zero) stays in float32, and so do
centroids that float16 cannot hold within ``2^-11`` of their own value; the
file records the dtype of every entry, `ExportStats.float32_leaves` names
them and the command line prints them.

Command line::

    python -m ec2t_jax.export --workdir /tmp/wd_mnist --out lenet5.ec2t --entropy-coding --fp16
    python -m ec2t_jax.export --workdir /tmp/wd_mnist --format onnx --out lenet5.onnx

``--format onnx`` writes an ONNX model instead (`ec2t_jax.onnx_export`, docs/onnx.md;
needs ``pip install 'ec2t_jax[onnx]'``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from ec2t_jax import cli, ternary, tree_util

__all__ = [
  'FORMAT_VERSION',
  'MAGIC',
  'MODEL_INFO_KEYS',
  'ExportStats',
  'dumps',
  'entropy_bound_bits',
  'load',
  'load_predictor',
  'loads',
  'main',
  'model_info',
  'run_model_info',
  'save',
  'ternary_leaves',
]

MAGIC = b'EC2TPACK'
FORMAT_VERSION = 1
_HEADER = struct.Struct('<8sHHIQ')
_DIGEST = 32
_FLAG_ENTROPY = 1
_FP_DTYPES = ('float16', 'float32')
_KINDS = ('ternary', 'ternary_ec', 'sparse', 'dense')
# The leaf dtypes a file may hold (the writer refuses others; the reader accepts no others).
_LEAF_DTYPES = (
  'bool',
  'int8',
  'int16',
  'int32',
  'int64',
  'uint8',
  'uint16',
  'uint32',
  'uint64',
  'float16',
  'float32',
  'float64',
  'bfloat16',
)
_TERNARY_DTYPES = ('float16', 'float32', 'float64')  # `_ternary_levels` packs only these.
# A file may decode to at most this many times its own size (plus 1 MiB): a forged
# manifest cannot make the reader allocate more than the bytes present justify.
_MAX_EXPANSION = 1 << 16
_MAX_DEPTH = 32  # Nesting of the manifest's JSON.
_FLOAT16_RTOL = 2.0**-11


class ExportStats(NamedTuple):
  """Sizes of one export (bytes unless stated).

  Attributes:
    total_bytes: the file.
    float32_bytes: the same leaves as raw float32 arrays (no container).
    header_bytes: fixed header, manifest, checksum.
    ternary_payload_bits: masks + signs (packed) or the range-coded stream.
    centroid_bytes: the centroid values of all ternary leaves.
    fp_bytes: every full-precision leaf.
    entropy_bound_bits: ``Σ_l N_l·H(P_l)`` over the ternary leaves.
    num_ternary: ternary weights.
    ternary_leaves: their count.
    float32_leaves: leaves kept in float32 although float16 was asked for
      (values or centroids that float16 cannot hold within ``2^-11``).
  """

  total_bytes: int
  float32_bytes: int
  header_bytes: int
  ternary_payload_bits: int
  centroid_bytes: int
  fp_bytes: int
  entropy_bound_bits: float
  num_ternary: int
  ternary_leaves: int
  float32_leaves: tuple[str, ...] = ()


# --- which leaves are ternary ----------------------------------------------------------------


def _check_variables(variables: Any) -> None:
  """Raises `ValueError` unless ``variables`` is a nested mapping with string keys."""
  if not isinstance(variables, Mapping):
    raise ValueError(
      f'variables must be a nested mapping like {{"params": ..., "batch_stats": ...}}, '
      f'got {type(variables).__name__}'
    )

  def walk(prefix, node):
    for key, value in node.items():
      if not isinstance(key, str):
        raise ValueError(f'variables keys must be strings, got {key!r} at {"/".join(prefix)}')
      if '/' in key:  # The manifest's paths are the '/'-separated leaf names.
        raise ValueError(f'variables keys must not contain "/", got {key!r}')
      if isinstance(value, Mapping):
        walk((*prefix, key), value)

  walk((), variables)


def _named_arrays(variables: Any) -> list[tuple[str, np.ndarray]]:
  """``[(leaf name, array)]`` of a nested mapping of arrays (`tree_util.named_leaves` order).

  Raises:
    ValueError: for a leaf whose dtype a file cannot hold (object, complex, strings).
  """
  _check_variables(variables)
  out = [
    (name, np.asarray(jax.device_get(value))) for name, value in tree_util.named_leaves(variables)
  ]
  for name, value in out:
    if str(value.dtype) not in _LEAF_DTYPES:
      raise ValueError(
        f'{name} has dtype {value.dtype}; an export holds {", ".join(_LEAF_DTYPES)} leaves'
      )
  return out


def _float16_holds(values: np.ndarray, *, per_value: bool) -> bool:
  """Whether float16 holds every finite value within ``2^-11`` (of itself, or of the leaf's
  largest magnitude), without overflowing to inf."""
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]
  if v.size == 0:
    return True
  with np.errstate(over='ignore'):
    h = v.astype(np.float16).astype(np.float64)
  if not np.all(np.isfinite(h)):
    return False
  scale = np.abs(v) if per_value else np.max(np.abs(v))
  return bool(np.all(np.abs(h - v) <= _FLOAT16_RTOL * scale))


def _ternary_levels(values: np.ndarray) -> tuple[float, float] | None:
  """`tree_util.ternary_levels` of a leaf that can be packed bit-exactly, else None.

  Only float16/32/64 leaves qualify (bfloat16 ones are stored as full
  precision), and no value may be -0.0: the packed form brings every zero back
  as +0.0.
  """
  if values.dtype.kind != 'f' or np.any(np.signbit(values[values == 0])):
    return None
  return tree_util.ternary_levels(values)


def ternary_leaves(variables: Any, opt_state: optax.OptState | None = None) -> set[str]:
  """Paths (``'params/conv2/kernel'``) of the leaves `save` packs as ternary.

  With ``opt_state`` these are the leaves EC2T compresses
  (`ec2t_jax.compressed_kernels`) whose values are ternary (entropy-constrained
  pruned leaves are not); without it, every params leaf of two or more
  dimensions whose values are exactly ``{-a, 0, +b}``.
  """
  flat = _named_arrays(variables)
  if opt_state is not None:
    from ec2t_jax import state_utils

    params = variables['params'] if 'params' in variables else variables
    candidates = {f'params/{name}' for name in state_utils.compressed_kernels(opt_state, params)}
  else:
    candidates = {name for name, value in flat if name.startswith('params/') and value.ndim >= 2}
  return {name for name, value in flat if name in candidates and _ternary_levels(value) is not None}


# --- writing ---------------------------------------------------------------------------------


def _symbol_counts(values: np.ndarray) -> list[int]:
  """``[#(w < 0), #(w == 0), #(w > 0)]``: a ternary leaf's symbols -w_n, 0, +w_p."""
  return [int(np.sum(values < 0)), int(np.sum(values == 0)), int(np.sum(values > 0))]


def _entropy_bits(counts: Sequence[int]) -> float:
  """``N·H(P)`` in bits of a leaf with these symbol counts (`ternary.entropy_bits` of ``P``)."""
  n = sum(counts)
  with jax.enable_x64(True):  # In float32, N·H(P) of a large layer would be off by bits.
    return n * float(ternary.entropy_bits(np.asarray(counts, np.float64) / n))


def entropy_bound_bits(variables: Any, opt_state: optax.OptState | None = None) -> float:
  """``Σ_l N_l·H(P_l)`` in bits over the ternary leaves (the entropy-coding target)."""
  flat = dict(_named_arrays(variables))
  tern = sorted(ternary_leaves(variables, opt_state))
  return float(sum(_entropy_bits(_symbol_counts(flat[name])) for name in tern))


def _constriction():
  try:
    import constriction
  except ImportError as e:  # pragma: no cover - a dependency of the package.
    raise ImportError(
      'entropy coding needs the `constriction` package: pip install constriction'
    ) from e
  return constriction


def _categorical(counts: Sequence[int]):
  """The coder's model of one leaf: its empirical symbol frequencies."""
  c = _constriction()
  p = np.asarray(counts, np.float64)
  return c.stream.model.Categorical(p / p.sum(), perfect=False)


# What a file records about its network (all optional, so that older files still load):
# the model's registered name (or 'package.module:factory') and constructor keywords,
# the classifier's outputs, one input image's (height, width, channels), and the per-channel
# (mean, std) applied to images scaled to [0, 1].
MODEL_INFO_KEYS = ('name', 'kwargs', 'num_classes', 'input_shape', 'normalization', 'dataset')


def _check_model_info(model: Mapping[str, Any] | None) -> dict[str, Any] | None:
  """Validates `model` metadata for `dumps` (JSON-serializable, known keys)."""
  if model is None:
    return None
  unknown = sorted(set(model) - set(MODEL_INFO_KEYS))
  if unknown:
    raise ValueError(f'unknown model info keys {unknown}; valid: {list(MODEL_INFO_KEYS)}')
  out = dict(model)
  try:
    json.dumps(out)
  except (TypeError, ValueError) as e:
    raise ValueError(f'model info must be JSON-serializable: {e}') from e
  return out


def model_info(path: str) -> dict[str, Any] | None:
  """The network description a file records (`save(..., model=...)`), or None if it has none.

  The file is checked (magic, length, checksum) as by `load`.
  """
  with open(path, 'rb') as f:
    manifest = _manifest(f.read())
  info = manifest.get('model')
  if info is not None and not isinstance(info, dict):
    raise ValueError(f'corrupt manifest: model info is a {type(info).__name__}, not an object')
  return info


def dumps(
  variables: Any,
  opt_state: optax.OptState | None = None,
  *,
  entropy_coding: bool = False,
  fp_dtype: str = 'float32',
  centroid_dtype: str = 'float32',
  model: Mapping[str, Any] | None = None,
) -> tuple[bytes, ExportStats]:
  """Serializes ``variables`` (see `save`) and returns ``(file bytes, stats)``."""
  model = _check_model_info(model)
  if fp_dtype not in _FP_DTYPES:
    raise ValueError(f'fp_dtype must be one of {list(_FP_DTYPES)}, got {fp_dtype!r}')
  if centroid_dtype not in _FP_DTYPES:
    raise ValueError(f'centroid_dtype must be one of {list(_FP_DTYPES)}, got {centroid_dtype!r}')
  flat = _named_arrays(variables)
  tern = ternary_leaves(variables, opt_state)
  chunks: list[bytes] = []
  offset = 0
  entries = []
  symbols: list[tuple[np.ndarray, list[int]]] = []
  tern_bits = centroid_bytes = fp_bytes = num_tern = 0
  bound = 0.0
  kept_float32 = []

  def put(blob: bytes) -> tuple[int, int]:
    nonlocal offset
    chunks.append(blob)
    start = offset
    offset += len(blob)
    return start, len(blob)

  for name, value in flat:
    entry: dict[str, Any] = {
      'path': name.split('/'),
      'shape': list(value.shape),
      'dtype': str(value.dtype),
    }
    if name in tern:
      w_p, w_n = _ternary_levels(value)
      flat_v = value.ravel()
      nonzero = flat_v != 0
      counts = _symbol_counts(flat_v)
      leaf_centroid_dtype = centroid_dtype
      if centroid_dtype == 'float16' and not _float16_holds([w_p, w_n], per_value=True):
        leaf_centroid_dtype = 'float32'
        kept_float32.append(name)
      cent = np.asarray([w_p, w_n], leaf_centroid_dtype).tobytes()
      entry.update(
        centroid_dtype=leaf_centroid_dtype,
        counts=counts,
        centroids=list(put(cent)),
      )
      centroid_bytes += len(cent)
      num_tern += value.size
      bound += _entropy_bits(counts)
      if entropy_coding:
        entry['kind'] = 'ternary_ec'
        sym = np.where(flat_v < 0, 0, np.where(flat_v > 0, 2, 1)).astype(np.int32)
        symbols.append((sym, counts))
      else:
        entry['kind'] = 'ternary'
        mask = np.packbits(nonzero).tobytes()
        signs = np.packbits(flat_v[nonzero] > 0).tobytes()
        entry['mask'] = list(put(mask))
        entry['signs'] = list(put(signs))
        tern_bits += 8 * (len(mask) + len(signs))
    else:
      leaf_dtype = fp_dtype
      if fp_dtype == 'float16' and value.dtype.kind == 'f':
        if not _float16_holds(value, per_value=False):
          leaf_dtype = 'float32'
          kept_float32.append(name)
      stored = value.astype(leaf_dtype) if value.dtype.kind == 'f' else value
      nonzero = stored.ravel() != 0
      nnz = int(nonzero.sum())
      dense_size = stored.nbytes
      sparse_size = math.ceil(value.size / 8) + nnz * stored.itemsize
      entry['stored_dtype'] = str(stored.dtype)
      if sparse_size < dense_size:
        entry['kind'] = 'sparse'
        entry['nnz'] = nnz
        entry['mask'] = list(put(np.packbits(nonzero).tobytes()))
        entry['values'] = list(put(stored.ravel()[nonzero].tobytes()))
        fp_bytes += sparse_size
      else:
        entry['kind'] = 'dense'
        entry['values'] = list(put(stored.tobytes()))
        fp_bytes += dense_size
    entries.append(entry)
  manifest: dict[str, Any] = {
    'format': 'ec2t_jax.export',
    'version': FORMAT_VERSION,
    'reference': 'Marban et al., EC2T, CVPR-W 2020, arXiv 2004.01077',
    'collections': sorted(variables),  # Empty ones (LeNet's batch_stats) come back too.
    'entries': entries,
  }
  if model is not None:
    manifest['model'] = model
  if entropy_coding and symbols:
    c = _constriction()
    encoder = c.stream.queue.RangeEncoder()
    for sym, counts in symbols:
      encoder.encode(sym, _categorical(counts))
    stream = np.asarray(encoder.get_compressed(), '<u4').tobytes()
    manifest['entropy_stream'] = {
      'coder': 'constriction.stream.queue.RangeEncoder',
      'model': 'Categorical(counts / N, perfect=False), one per leaf, in entry order',
      'constriction': getattr(c, '__version__', 'unknown'),
      'range': list(put(stream)),
    }
    tern_bits = 8 * len(stream)
  payload = b''.join(chunks)
  manifest_bytes = json.dumps(manifest, separators=(',', ':')).encode('utf-8')
  flags = _FLAG_ENTROPY if entropy_coding else 0
  header = _HEADER.pack(MAGIC, FORMAT_VERSION, flags, len(manifest_bytes), len(payload))
  body = header + manifest_bytes + payload
  data = body + hashlib.sha256(body).digest()
  stats = ExportStats(
    total_bytes=len(data),
    float32_bytes=sum(4 * v.size for _, v in flat),
    header_bytes=_HEADER.size + len(manifest_bytes) + _DIGEST,
    ternary_payload_bits=tern_bits,
    centroid_bytes=centroid_bytes,
    fp_bytes=fp_bytes,
    entropy_bound_bits=bound,
    num_ternary=num_tern,
    ternary_leaves=len(tern),
    float32_leaves=tuple(kept_float32),
  )
  if kept_float32:
    logging.warning(
      'kept in float32 (float16 cannot hold their values within 2^-11): %s',
      ', '.join(kept_float32),
    )
  return data, stats


def save(
  path: str,
  variables: Any,
  opt_state: optax.OptState | None = None,
  *,
  entropy_coding: bool = False,
  fp_dtype: str = 'float32',
  centroid_dtype: str = 'float32',
  model: Mapping[str, Any] | None = None,
) -> ExportStats:
  """Writes ``variables`` to one self-describing file.

  Args:
    path: the file to write.
    variables: ``{'params': ..., 'batch_stats': ...}`` (nested mappings of arrays).
    opt_state: the EC2T optimizer state; it decides which leaves are ternary.
      Without it, params leaves whose values are ``{-a, 0, +b}`` are.
    entropy_coding: range-code the ternary symbols (``≈ Σ N·H(P)`` bits)
      instead of mask + sign bits (``N + nnz`` bits).
    fp_dtype: ``'float32'`` or ``'float16'``, for the full-precision leaves.
    centroid_dtype: ``'float32'`` (bit-exact) or ``'float16'`` for ``w_p, w_n``.
    model: what it takes to run the network, stored in the file (see
      `MODEL_INFO_KEYS`; `python -m ec2t_jax.export` fills it from the run):
      ``{'name', 'kwargs', 'num_classes', 'input_shape', 'normalization'}``.
      `load_predictor` turns such a file into a function.

  Returns:
    `ExportStats` of the written file.

  Raises:
    ValueError: for a dtype name not in ``('float16', 'float32')`` or variables
      that are not nested mappings of arrays.

  Example:
    >>> save('lenet.ec2t', run.variables, run.opt_state, entropy_coding=True)  # doctest: +SKIP
    >>> load('lenet.ec2t')['params']['fc1']['kernel'].shape  # doctest: +SKIP
    (400, 120)
  """
  data, stats = dumps(
    variables,
    opt_state,
    entropy_coding=entropy_coding,
    fp_dtype=fp_dtype,
    centroid_dtype=centroid_dtype,
    model=model,
  )
  with open(path, 'wb') as f:
    f.write(data)
  return stats


# --- reading ---------------------------------------------------------------------------------


def _slice(payload: bytes, where: Any, what: str) -> bytes:
  if (
    not isinstance(where, list)
    or len(where) != 2
    or not all(isinstance(x, int) and x >= 0 for x in where)
    or where[0] + where[1] > len(payload)
  ):
    raise ValueError(f'corrupt manifest: {what} points outside the payload ({where!r})')
  return payload[where[0] : where[0] + where[1]]


def _dtype(name: Any, what: str, allowed: Sequence[str] = _LEAF_DTYPES) -> np.dtype:
  """The dtype `name` of an entry, if it is one the writer produces for that field."""
  if not isinstance(name, str) or name not in allowed:
    raise ValueError(
      f'corrupt manifest: {what} has dtype {name!r}; this field holds one of {list(allowed)}'
    )
  return np.dtype(jax.numpy.dtype(name))


def _depth(value: Any) -> int:
  """The nesting depth of a parsed JSON value (iteratively: no recursion limit)."""
  deepest, stack = 0, [(value, 1)]
  while stack:
    node, depth = stack.pop()
    if isinstance(node, (dict, list)):
      deepest = max(deepest, depth)
      if deepest > _MAX_DEPTH:
        return deepest
      stack.extend(
        (child, depth + 1) for child in (node.values() if isinstance(node, dict) else node)
      )
  return deepest


def _check_sizes(manifest: dict[str, Any], payload: bytes, file_bytes: int) -> None:
  """Refuses entries that would decode to more than the bytes present can justify.

  Raises:
    ValueError: when the entries declare more than `_MAX_EXPANSION` times the
      file's size (plus 1 MiB), or an entropy-coded entry's symbol counts carry
      more information (``N·H(P)`` bits) than the stream holds.
  """
  total, info_bits = 0, 0.0
  for i, entry in enumerate(manifest['entries']):
    if not isinstance(entry, dict):
      raise ValueError(f'corrupt manifest: entry {i} is not an object')
    shape = entry.get('shape')
    if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**63 for d in shape)):
      raise ValueError(f'corrupt manifest: entry {i} has shape {shape!r}')
    n = math.prod(shape)
    total += n * 8  # Decoding holds at most 8 bytes per value at a time.
    counts = entry.get('counts')
    if entry.get('kind') == 'ternary_ec' and isinstance(counts, list) and len(counts) == 3:
      if all(type(c) is int and c >= 0 for c in counts) and sum(counts) == n and n:
        p = np.asarray([c for c in counts if c], np.float64) / n
        info_bits += 0.999 * n * float(-np.sum(p * np.log2(p)))  # N·H(P), rounded down.
  limit = _MAX_EXPANSION * file_bytes + (1 << 20)
  if total > limit:
    raise ValueError(
      f'corrupt or forged export: its entries declare {total:,d} bytes of values, more than '
      f'{_MAX_EXPANSION}x the {file_bytes:,d}-byte file'
    )
  stream = manifest.get('entropy_stream')
  if info_bits and isinstance(stream, dict):
    where = stream.get('range')
    have = 8 * where[1] if isinstance(where, list) and len(where) == 2 else 0
    if isinstance(have, int) and info_bits > have + 64 * len(manifest['entries']):
      raise ValueError(
        f'corrupt or forged export: the entropy-coded entries need at least '
        f'{info_bits:,.0f} bits, the stream holds {have:,d}'
      )


def _manifest(data: bytes) -> dict[str, Any]:
  """The checked manifest of a file's bytes (magic, version, length, checksum, JSON)."""
  return _parse(data)[0]


def _parse(data: bytes) -> tuple[dict[str, Any], int, bytes]:
  """`(manifest, flags, payload)` of a file's bytes, after every whole-file check."""
  if len(data) < _HEADER.size + _DIGEST:
    raise ValueError(
      f'not an ec2t_jax export: {len(data)} bytes is shorter than the '
      f'{_HEADER.size + _DIGEST}-byte header and checksum'
    )
  magic, version, flags, manifest_len, payload_len = _HEADER.unpack_from(data)
  if magic != MAGIC:
    raise ValueError(f'not an ec2t_jax export: magic {magic!r}, expected {MAGIC!r}')
  if version != FORMAT_VERSION:
    raise ValueError(f'unsupported export version {version}; this reader knows {FORMAT_VERSION}')
  expected = _HEADER.size + manifest_len + payload_len + _DIGEST
  if len(data) != expected:
    raise ValueError(
      f'export is truncated or has trailing bytes: {len(data)} bytes, the header says {expected}'
    )
  body, digest = data[:-_DIGEST], data[-_DIGEST:]
  if hashlib.sha256(body).digest() != digest:
    raise ValueError('export checksum mismatch: the file is corrupted')
  try:
    manifest = json.loads(body[_HEADER.size : _HEADER.size + manifest_len].decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'corrupt manifest: {e}') from e
  except RecursionError as e:
    raise ValueError(f'corrupt manifest: nested more than {_MAX_DEPTH} levels deep') from e
  if not isinstance(manifest, dict) or not isinstance(manifest.get('entries'), list):
    raise ValueError('corrupt manifest: no list of entries')
  if _depth(manifest) > _MAX_DEPTH:
    raise ValueError(f'corrupt manifest: nested more than {_MAX_DEPTH} levels deep')
  payload = body[_HEADER.size + manifest_len :]
  _check_sizes(manifest, payload, len(data))
  return manifest, flags, payload


def loads(data: bytes) -> dict[str, Any]:
  """Decodes the bytes of `save` / `dumps` (see `load`)."""
  manifest, flags, payload = _parse(data)
  decoder = None
  if flags & _FLAG_ENTROPY and 'entropy_stream' in manifest:
    stream = _slice(payload, manifest['entropy_stream'].get('range'), 'the entropy stream')
    if len(stream) % 4:
      raise ValueError('corrupt entropy stream: not a whole number of 32-bit words')
    words = np.frombuffer(stream, '<u4').astype(np.uint32)
    decoder = _constriction().stream.queue.RangeDecoder(words)
  out: dict[str, Any] = {
    str(name): {} for name in manifest.get('collections', []) if isinstance(name, str)
  }
  for i, entry in enumerate(manifest['entries']):
    if not isinstance(entry, dict):
      raise ValueError(f'corrupt manifest: entry {i} is not an object')
    value = _decode_entry(entry, payload, decoder, i)
    node = out
    *parents, leaf = entry['path']
    for key in parents:
      node = node.setdefault(key, {})
      if not isinstance(node, dict):
        raise ValueError(f'corrupt manifest: {"/".join(entry["path"])} is below a leaf')
    if leaf in node:
      raise ValueError(f'corrupt manifest: {"/".join(entry["path"])} appears twice')
    node[leaf] = value
  return out


def _decode_entry(entry: dict[str, Any], payload: bytes, decoder: Any, i: int) -> np.ndarray:
  path = entry.get('path')
  kind = entry.get('kind')
  shape = entry.get('shape')
  if not (isinstance(path, list) and path and all(isinstance(k, str) for k in path)):
    raise ValueError(f'corrupt manifest: entry {i} has no valid path')
  name = '/'.join(path)
  if kind not in _KINDS:
    raise ValueError(f'corrupt manifest: {name} has kind {kind!r}; valid kinds: {list(_KINDS)}')
  if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
    raise ValueError(f'corrupt manifest: {name} has shape {shape!r}')
  ternary_kind = kind in ('ternary', 'ternary_ec')
  dtype = _dtype(entry.get('dtype'), name, _TERNARY_DTYPES if ternary_kind else _LEAF_DTYPES)
  n = math.prod(shape)
  if ternary_kind:
    counts = entry.get('counts')
    if not (
      isinstance(counts, list)
      and len(counts) == 3
      and all(type(c) is int and c >= 0 for c in counts)
      and sum(counts) == n
    ):
      raise ValueError(f'corrupt manifest: {name} has symbol counts {counts!r} for {n} weights')
    cdtype = _dtype(entry.get('centroid_dtype'), f'{name} centroids', _FP_DTYPES)
    cent = np.frombuffer(_slice(payload, entry.get('centroids'), f'{name} centroids'), cdtype)
    if cent.size != 2:
      raise ValueError(f'corrupt payload: {name} has {cent.size} centroid values, expected 2')
    w_p, w_n = cent.astype(dtype)
    if kind == 'ternary':
      mask = np.unpackbits(
        np.frombuffer(_slice(payload, entry.get('mask'), f'{name} mask'), np.uint8)
      )
      if mask.size != 8 * math.ceil(n / 8) or mask[n:].any():
        raise ValueError(f'corrupt payload: the mask of {name} does not fit {n} weights')
      mask = mask[:n].astype(bool)
      nnz = int(mask.sum())
      if nnz != counts[0] + counts[2]:
        raise ValueError(f'corrupt payload: the mask of {name} has {nnz} non-zeros')
      signs = np.unpackbits(
        np.frombuffer(_slice(payload, entry.get('signs'), f'{name} signs'), np.uint8)
      )
      if signs.size != 8 * math.ceil(nnz / 8):
        raise ValueError(f'corrupt payload: {name} has {signs.size} sign bits for {nnz} non-zeros')
      positive = signs[:nnz].astype(bool)
      if int(positive.sum()) != counts[2]:
        raise ValueError(f'corrupt payload: the signs of {name} disagree with its counts')
      values = np.zeros(n, dtype)
      values[mask] = np.where(positive, w_p, -w_n)
    else:
      if decoder is None:
        raise ValueError(f'corrupt export: {name} is entropy coded but the file has no stream')
      try:
        sym = np.asarray(decoder.decode(_categorical(counts), n))
      except Exception as e:  # The coder raises its own types on exhausted streams.
        raise ValueError(f'corrupt entropy stream while decoding {name}: {e}') from e
      got = [int(np.sum(sym == k)) for k in range(3)]
      if got != counts:
        raise ValueError(
          f'entropy stream of {name} decodes to counts {got}, expected {counts} '
          '(corrupt, or written by an incompatible constriction version)'
        )
      table = np.asarray([-w_n, 0, w_p], dtype)
      values = table[sym]
    return values.reshape(shape)
  if dtype.kind == 'f':
    allowed = _FP_DTYPES
  else:  # bfloat16, integers and bools are stored as they are.
    allowed = (str(dtype),)
  stored = _dtype(entry.get('stored_dtype'), f'{name} (stored)', allowed)
  if kind == 'dense':
    raw = _slice(payload, entry.get('values'), f'{name} values')
    if len(raw) != n * stored.itemsize:
      raise ValueError(
        f'corrupt payload: {name} has {len(raw)} bytes, expected {n * stored.itemsize}'
      )
    return np.frombuffer(raw, stored).astype(dtype).reshape(shape)
  mask = np.unpackbits(np.frombuffer(_slice(payload, entry.get('mask'), f'{name} mask'), np.uint8))
  if mask.size != 8 * math.ceil(n / 8):
    raise ValueError(f'corrupt payload: the mask of {name} does not fit {n} values')
  mask = mask[:n].astype(bool)
  raw = _slice(payload, entry.get('values'), f'{name} values')
  if len(raw) != int(mask.sum()) * stored.itemsize:
    raise ValueError(
      f'corrupt payload: {name} has {len(raw)} value bytes for {mask.sum()} non-zeros'
    )
  values = np.zeros(n, dtype)
  values[mask] = np.frombuffer(raw, stored).astype(dtype)
  return values.reshape(shape)


def load(path: str) -> dict[str, Any]:
  """Reads a file written by `save`.

  Args:
    path: the file.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` as nested dicts of NumPy arrays in
    the dtypes they were saved from. Ternary leaves are bit-identical to the
    saved ones when their centroids were stored in float32.

  Raises:
    ValueError: if the file is not an export, is truncated, fails its checksum,
      or any entry does not decode consistently.
  """
  with open(path, 'rb') as f:
    return loads(f.read())


def load_predictor(path: str, *, dtype: Any = None) -> Callable[[Any], jax.Array]:
  """Turns a file with model info into a jitted function `images -> logits`.

  The file must record its network (`python -m ec2t_jax.export` writes that;
  `save(..., model=...)` in your own code). The function takes a batch of
  images as the run's dataset holds them, `(N, height, width, channels)` or
  `(N, height, width)`: uint8 pixels are divided by 255, float pixels are taken
  on [0, 1]; then the run's normalization is applied and the network runs in
  eval mode (BatchNorm statistics from the file). Images must already have the
  recorded `input_shape` (resize/crop as the run's evaluation did).

  Args:
    path: an `.ec2t` file.
    dtype: compute dtype passed to the model (e.g. `jnp.bfloat16`); default float32.

  Returns:
    `predict(images) -> logits`, float32 `(N, num_classes)`; `predict.info` is the model info.

  Raises:
    ValueError: if the file records no model (older files) or is not a valid export.

  Example:
    >>> predict = load_predictor('lenet5.ec2t')  # doctest: +SKIP
    >>> logits = predict(mnist_test_images)       # doctest: +SKIP
  """
  import jax.numpy as jnp

  from ec2t_jax import models  # Local: flax only for this function.

  info = model_info(path)
  if not info or 'name' not in info or 'num_classes' not in info:
    raise ValueError(
      f'{path!r} records no model; export it with python -m ec2t_jax.export, or pass '
      "model={'name': ..., 'num_classes': ..., ...} to ec2t_jax.export.save"
    )
  variables = load(path)
  kwargs = dict(info.get('kwargs') or {})
  if dtype is not None:
    kwargs['dtype'] = dtype
  model = models.create(info['name'], num_classes=int(info['num_classes']), **kwargs)
  shape = tuple(info.get('input_shape') or ())
  mean, std = info.get('normalization') or ((0.0,), (1.0,))
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

  @jax.jit
  def apply(images):
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
      x = x * np.float32(1.0 / 255.0)
    if shape and x.ndim == len(shape):  # (N, H, W) grayscale: add the channel axis.
      x = x[..., None]
    return model.apply(variables, (x - mean) / std, train=False).astype(jnp.float32)

  def predict(images):
    images = jnp.asarray(images)
    if shape and tuple(images.shape[1:]) not in (shape, shape[:-1]):
      raise ValueError(f'images of shape {images.shape[1:]} given; the network takes {shape}')
    return apply(images)

  predict.info = info
  return predict


# --- command line ----------------------------------------------------------------------------


def run_model_info(run: Any) -> dict[str, Any]:
  """The `model` metadata of a run read by `ec2t_jax.training.workdir.load_workdir`."""
  kwargs = run.config.get('model_kwargs') or {}
  kwargs = kwargs.to_dict() if hasattr(kwargs, 'to_dict') else dict(kwargs)
  info = {
    'name': run.config.model,
    'kwargs': kwargs,
    'num_classes': int(run.num_classes),
    'input_shape': [int(d) for d in run.image_shape],
    'dataset': run.config.dataset,
  }
  if run.normalization is not None:
    info['normalization'] = [list(run.normalization[0]), list(run.normalization[1])]
  return info


def _kb(n: float) -> str:
  """Bytes as KiB (1024 bytes) with one decimal, as report.md writes them."""
  return f'{n / 1024:,.1f} KiB'


def _write_onnx(onnx_export: Any, run: Any, out: str) -> int:
  """`main`'s ``--format onnx``: the run's network with its input normalization, as ONNX."""
  info = run_model_info(run)
  try:
    proto = onnx_export.to_onnx(
      run.model,
      run.variables,
      run.image_shape,
      ternary_leaves=ternary_leaves(run.variables, run.opt_state),
      normalization=run.normalization,
      metadata={'ec2t_jax.model': info},
    )
    size = onnx_export.save(out, proto)
  except (ValueError, NotImplementedError, OSError, onnx_export.onnx.checker.ValidationError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 2
  tern = onnx_export.ternary_initializers(proto)
  props = {p.key: json.loads(p.value) for p in proto.metadata_props}
  folded = props['ec2t_jax.folded_batch_norms']
  float32 = sum(np.asarray(v).size * 4 for _, v in tree_util.named_leaves(run.variables))
  shape = ', '.join(str(d) for d in run.image_shape)
  print(
    f'checkpoint {run.step}: {len(tern)} ternary kernels stored as int8, '
    f'{len(folded)} BatchNorms folded into their convolutions'
  )
  scaling = (
    "on [0, 1], the run's (x - mean) / std computed in the graph"
    if run.normalization
    else 'on [0, 1], without normalization (the checkpoint records none)'
  )
  print(
    f'input images: float32 (batch, {shape}) {scaling}; output logits (batch, {run.num_classes})'
  )
  print(f'wrote {out} (onnx, {size:,d} bytes = {_kb(size)}; float32 checkpoint {_kb(float32)})')
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Exports a workdir's newest (or best) checkpoint and prints the sizes."""
  parser = argparse.ArgumentParser(
    prog='python -m ec2t_jax.export', description=__doc__.split('\n\n')[0]
  )
  parser.add_argument('--workdir', required=True, help='a workdir of main.py / train_and_evaluate')
  parser.add_argument('--out', required=True, help='the file to write')
  parser.add_argument(
    '--format',
    choices=('ec2t', 'onnx'),
    default='ec2t',
    help="ec2t: this module's file; onnx: an ONNX model with int8 ternary kernels "
    '(docs/onnx.md; --entropy-coding, --fp16 and --fp16-centroids are refused with it)',
  )
  parser.add_argument(
    '--entropy-coding',
    action='store_true',
    help='write the range-coded file instead of the packed (mask + sign bits) one',
  )
  parser.add_argument('--fp16', action='store_true', help='full-precision leaves in float16')
  parser.add_argument(
    '--fp16-centroids', action='store_true', help='centroids in float16 (not bit-exact)'
  )
  parser.add_argument('--best', action='store_true', help='the best-by-validation checkpoint')
  args = parser.parse_args(argv)
  if args.format == 'onnx':
    for flag in ('entropy_coding', 'fp16', 'fp16_centroids'):
      if getattr(args, flag):
        option = '--' + flag.replace('_', '-')
        print(f'error: {option} applies to --format ec2t only, got --format onnx', file=sys.stderr)
        return 2
  problem = cli.output_path_error('--out', args.out)
  if problem:
    print(problem, file=sys.stderr)
    return 2
  if args.format == 'onnx':
    try:
      from ec2t_jax import onnx_export  # Local: an optional extra.
    except ImportError:
      print("error: --format onnx needs onnx: pip install 'ec2t_jax[onnx]'", file=sys.stderr)
      return 2
  from ec2t_jax.training import workdir as workdir_lib  # Local: keeps `--help` fast.

  progress = workdir_lib.progress_printer('export')
  try:
    run = workdir_lib.load_workdir(
      args.workdir, best=args.best, progress=progress, compilation_cache=True
    )
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.format == 'onnx':
    if progress is not None:
      progress(f'converting checkpoint {run.step} to ONNX')
    return _write_onnx(onnx_export, run, args.out)
  options = dict(
    fp_dtype='float16' if args.fp16 else 'float32',
    centroid_dtype='float16' if args.fp16_centroids else 'float32',
    model=run_model_info(run),
  )
  if progress is not None:
    progress(f'packing checkpoint {run.step}, with and without entropy coding')
  try:
    packed, p_stats = dumps(run.variables, run.opt_state, entropy_coding=False, **options)
    coded, e_stats = dumps(run.variables, run.opt_state, entropy_coding=True, **options)
    data = coded if args.entropy_coding else packed
    with open(args.out, 'wb') as f:
      f.write(data)
  except (ValueError, OSError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 2
  ref = p_stats.float32_bytes
  print(
    f'checkpoint {run.step}: {p_stats.ternary_leaves} ternary leaves '
    f'({p_stats.num_ternary:,d} weights); full-precision leaves in {options["fp_dtype"]}, '
    f'centroids in {options["centroid_dtype"]}'
  )
  if not p_stats.ternary_leaves:
    if not run.schedule.compressed_at(run.step):
      print(
        f'note: checkpoint {run.step} is in the full-precision stage (EC2T starts at step '
        f'{run.schedule.compression_start}): every leaf is stored as full precision'
      )
  if p_stats.float32_leaves:
    print(
      'kept in float32 (float16 cannot hold their values within 2^-11): '
      + ', '.join(p_stats.float32_leaves)
    )
  # The sizes of the files this command writes with these options (the written one and
  # the other kind), byte for byte; report.md lists those of `--fp16`.
  print(f'{"":<24} {"bytes":>12} {"size":>14} {"ratio":>8}')
  for label, size in (
    ('float32 checkpoint', ref),
    ('packed (mask + sign)', p_stats.total_bytes),
    ('entropy coded', e_stats.total_bytes),
  ):
    print(f'{label:<24} {size:>12,d} {_kb(size):>14} {ref / size:>7.1f}x')
  bound = e_stats.entropy_bound_bits
  overhead = (
    f'coded {100 * (e_stats.ternary_payload_bits / bound - 1):+.2f}%' if bound > 0 else 'no bound'
  )
  print(
    f'ternary payload: packed {p_stats.ternary_payload_bits:,d} bits, entropy coded '
    f'{e_stats.ternary_payload_bits:,d} bits, sum N*H(P) = {bound:,.0f} bits ({overhead})'
  )
  kind = 'entropy coded' if args.entropy_coding else 'packed'
  print(f'wrote {args.out} ({kind}, {len(data):,d} bytes = {_kb(len(data))})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
