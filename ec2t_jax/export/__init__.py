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

The package: `layout` (header, constants, `ExportStats`), `writer` (`dumps`, `save`),
`reader` (`loads`, `load`), `entropy` (the range coder), `model` (`model_info`,
`run_model_info`, `load_predictor`), `command` (the command line, `main`);
`ec2t_jax.export_leaves.ternary_leaves` picks the ternary leaves (shared with
`ec2t_jax.onnx_export`, which this package's library does not import).
"""

from ec2t_jax.export.command import main
from ec2t_jax.export.entropy import entropy_bound_bits
from ec2t_jax.export.layout import _HEADER as _HEADER
from ec2t_jax.export.layout import FORMAT_VERSION, MAGIC, ExportStats
from ec2t_jax.export.model import MODEL_INFO_KEYS, load_predictor, model_info, run_model_info
from ec2t_jax.export.reader import load, loads
from ec2t_jax.export.writer import dumps, save
from ec2t_jax.export_leaves import ternary_leaves

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
