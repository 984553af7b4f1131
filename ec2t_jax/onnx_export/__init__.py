"""ONNX export of a trained EC2T network, with its ternary kernels stored as int8.

`to_onnx` traces ``model.apply(variables, x, train=False)`` to a jaxpr whose
inputs are the image batch and every variable leaf, and translates that jaxpr
equation by equation into an ONNX graph with `onnx.helper` (no third-party
converter). The graph runs in any ONNX runtime; the tests compare
onnxruntime's CPU logits with `model.apply` (docs/onnx.md).

What the file holds:

* a ternary leaf ``q`` with values ``{-w_n, 0, +w_p}`` (EC2T, Marban et al.,
  CVPR-W 2020, arXiv 2004.01077, §3) is an int8 initializer ``t = sign(q)``
  plus its two float scales; the graph rebuilds the kernel as
  ``w_p·relu(t) - w_n·relu(-t)`` (the two masks and the paper's two
  multiplications), which is bit-identical to ``q`` and which a runtime folds
  into a constant when it loads the model;
* a BatchNorm in eval mode that directly follows a convolution is folded into
  it: with ``s = γ / sqrt(var + ε)`` the convolution's kernel becomes ``K·s``
  (per output channel; for a ternary ``K`` still stored as int8 plus its
  scales, with ``s`` as one float vector) and its bias ``(b - mean)·s + β``,
  so that no normalization runs at inference;
* every other leaf is a float initializer; leaves the graph does not read
  (the folded BatchNorm statistics) are left out.

The batch dimension is symbolic (``'batch'``): the model is traced at two batch
sizes, and every dimension that differs between the two traces is a multiple
of the batch, which the graph computes from its input's shape at run time.

Example:
  >>> from ec2t_jax import models
  >>> model = models.create('lenet5', num_classes=10)
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  >>> proto = to_onnx(model, variables, (28, 28, 1))  # doctest: +SKIP
  >>> save('lenet5.onnx', proto)  # doctest: +SKIP

The package: `graph` (the ONNX graph being built, its input/output names and opsets),
`batch_norm` (which BatchNorms fold into their convolutions, and the folding),
`tracing` (the two traces at different batch sizes), `translate` (one ONNX translation per
JAX primitive) and `convert` (`to_onnx`, `save`, `ternary_initializers`). The ternary
leaves come from `ec2t_jax.export_leaves`; nothing here imports `ec2t_jax.export`.
"""

# First, so that a missing onnx is this one-line error, whichever module is imported.
try:
  import onnx as onnx
  from onnx import helper as helper
  from onnx import numpy_helper as numpy_helper
except ImportError as e:  # pragma: no cover - depends on the environment.
  raise ImportError("ONNX export needs the onnx package: pip install 'ec2t_jax[onnx]'") from e

from ec2t_jax.onnx_export.batch_norm import FoldedBatchNorm, folded_batch_norms
from ec2t_jax.onnx_export.convert import save, ternary_initializers, to_onnx
from ec2t_jax.onnx_export.graph import BATCH_DIM as BATCH_DIM
from ec2t_jax.onnx_export.graph import (
  DEFAULT_OPSET,
  INPUT_NAME,
  MAX_OPSET,
  MIN_OPSET,
  OUTPUT_NAME,
)

__all__ = [
  'DEFAULT_OPSET',
  'INPUT_NAME',
  'OUTPUT_NAME',
  'FoldedBatchNorm',
  'MAX_OPSET',
  'MIN_OPSET',
  'folded_batch_norms',
  'save',
  'ternary_initializers',
  'to_onnx',
]
