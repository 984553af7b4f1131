"""The `.ec2t` file's layout: magic, version, header, the kinds of entries, `ExportStats`.

See `ec2t_jax.export` for the layout itself; `writer` and `reader` share these constants.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = ['FORMAT_VERSION', 'MAGIC', 'ExportStats']

MAGIC = b'EC2TPACK'
FORMAT_VERSION = 1
_HEADER = struct.Struct('<8sHHIQ')
_DIGEST = 32
_FLAG_ENTROPY = 1
_FP_DTYPES = ('float16', 'float32')
_KINDS = ('ternary', 'ternary_ec', 'sparse', 'dense')
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
