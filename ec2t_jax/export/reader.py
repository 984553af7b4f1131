"""Reading a `.ec2t` file: every whole-file check, then each entry (`loads`, `load`).

A truncated, corrupted, forged or foreign file raises a one-line `ValueError` before any
allocation its bytes cannot justify, never wrong weights (see `ec2t_jax.export`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ec2t_jax.export.entropy import _categorical, _constriction
from ec2t_jax.export.layout import (
  _DIGEST,
  _FLAG_ENTROPY,
  _FP_DTYPES,
  _HEADER,
  _KINDS,
  _MAX_DEPTH,
  _MAX_EXPANSION,
  _TERNARY_DTYPES,
  FORMAT_VERSION,
  MAGIC,
)
from ec2t_jax.export_leaves import _LEAF_DTYPES

__all__ = ['load', 'loads']


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
