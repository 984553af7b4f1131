"""Writing a `.ec2t` file: `dumps` and `save` (see `ec2t_jax.export` for the format)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import optax

from ec2t_jax import files
from ec2t_jax.export.entropy import _categorical, _constriction, _entropy_bits, _symbol_counts
from ec2t_jax.export.layout import (
  _DIGEST,
  _FLAG_ENTROPY,
  _FLOAT16_RTOL,
  _FP_DTYPES,
  _HEADER,
  FORMAT_VERSION,
  MAGIC,
  ExportStats,
)
from ec2t_jax.export.model import _check_model_info
from ec2t_jax.export_leaves import _named_arrays, _ternary_levels, ternary_leaves

__all__ = ['dumps', 'save']


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
  files.replace_file(path, data)  # A failed write leaves an old file whole.
  return stats
