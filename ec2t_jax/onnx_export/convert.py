"""`to_onnx`: a linen model's eval-mode forward pass as an ONNX model; `save`.

The entry point of `ec2t_jax.onnx_export`: it folds the BatchNorms (`batch_norm`), traces
the model twice (`tracing`), translates the jaxpr (`translate`) into the graph (`graph`)
and stores the ternary leaves as int8 plus two scales.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import onnx
from onnx import helper

from ec2t_jax import export_leaves, files, tree_util
from ec2t_jax.onnx_export.batch_norm import _folding, folded_batch_norms
from ec2t_jax.onnx_export.graph import (
  BATCH_DIM,
  DEFAULT_OPSET,
  INPUT_NAME,
  MAX_OPSET,
  MIN_OPSET,
  OUTPUT_NAME,
  _Graph,
  _onnx_dtype,
)
from ec2t_jax.onnx_export.tracing import _TRACE_BATCHES, _Batch, _trace
from ec2t_jax.onnx_export.translate import _FLOAT32_HOWTO, _is_float, _Translator

__all__ = ['save', 'ternary_initializers', 'to_onnx']

# --- ternary leaves ---------------------------------------------------------------------------


def _ternary_kernel(graph: _Graph, name: str, values: np.ndarray) -> str:
  """``w_p·relu(t) - w_n·relu(-t)`` from the int8 ``t = sign(values)`` and the two scales."""
  w_p, w_n = tree_util.ternary_levels(values)
  t = graph.initializer(np.sign(values).astype(np.int8), f'{name}:int8')
  scale_p = graph.initializer(np.asarray(w_p, values.dtype), f'{name}:w_p')
  scale_n = graph.initializer(np.asarray(w_n, values.dtype), f'{name}:w_n')
  tf = graph.node('Cast', [t], to=_onnx_dtype(values.dtype))
  pos = graph.node('Mul', [graph.node('Relu', [tf]), scale_p])
  neg = graph.node('Mul', [graph.node('Relu', [graph.node('Neg', [tf])]), scale_n])
  return graph.node('Sub', [pos, neg])


def _check_ternary(flat: Mapping[str, np.ndarray], names: Any) -> list[str]:
  out = []
  for name in sorted(names):
    if name not in flat:
      raise ValueError(
        f'ternary leaf {name!r} is not a leaf of the variables; valid names look like '
        f'{sorted(flat)[:3]}'
      )
    value = flat[name]
    if tree_util.ternary_levels(value) is None:  # Also None for a non-floating leaf.
      raise ValueError(
        f'ternary leaf {name!r} does not hold the values {{-w_n, 0, +w_p}} '
        f'({value.dtype}, {np.unique(value).size} distinct values)'
      )
    if np.any(np.signbit(value[value == 0])):
      raise ValueError(f'ternary leaf {name!r} holds -0.0, which int8 storage would turn into +0.0')
    out.append(name)
  return out


def _check_float32(flat: Mapping[str, np.ndarray]) -> None:
  bad = {name: str(v.dtype) for name, v in flat.items() if _is_float(v.dtype)}
  bad = {name: dtype for name, dtype in bad.items() if dtype != 'float32'}
  if bad:
    name = sorted(bad)[0]
    raise ValueError(
      f'variable leaf {name!r} is {bad[name]} ({len(bad)} floating leaves are not float32); '
      + _FLOAT32_HOWTO
    )


def ternary_initializers(proto: Any) -> list[str]:
  """Names of the ternary leaves a model from `to_onnx` stores as int8 initializers."""
  return sorted(
    init.name[: -len(':int8')]
    for init in proto.graph.initializer
    if init.name.endswith(':int8') and init.data_type == onnx.TensorProto.INT8
  )


# --- public API -------------------------------------------------------------------------------


def to_onnx(
  model: Any,
  variables: Any,
  input_shape: Sequence[int],
  *,
  opset: int = DEFAULT_OPSET,
  ternary_leaves: Any = None,
  fold_batch_norm: bool = True,
  normalization: tuple[Sequence[float], Sequence[float]] | None = None,
  metadata: Mapping[str, Any] | None = None,
  check: bool = True,
) -> Any:
  """Translates a linen model's eval-mode forward pass into an ONNX model.

  The graph takes ``images``, float32 ``(batch, *input_shape)`` in the
  model's own layout (NHWC for the zoo), and returns ``logits``. The batch
  size is free.

  Args:
    model: a linen module called as ``model.apply(variables, x, train=False)``.
    variables: its variables, ``{'params': ..., 'batch_stats': ...}``.
    input_shape: one example's shape, without the batch, e.g. ``(28, 28, 1)``.
    opset: the ONNX opset, ``MIN_OPSET`` to ``MAX_OPSET``.
    ternary_leaves: paths (``'params/conv2/kernel'``) of the leaves to store as
      int8 plus two scales; default `ec2t_jax.export.ternary_leaves` of
      ``variables`` (every params leaf of 2+ dimensions with values
      ``{-w_n, 0, +w_p}``). Pass ``export.ternary_leaves(variables, opt_state)``
      to use the optimizer's selection.
    fold_batch_norm: fold eval-mode BatchNorms into the convolutions before them
      (`folded_batch_norms`).
    normalization: ``(mean, std)`` per channel; the graph then takes images on
      [0, 1] and computes ``(x - mean) / std`` first, as the training input
      pipeline does.
    metadata: JSON-serializable values recorded in the model's
      ``metadata_props`` (as JSON strings).
    check: run `onnx.checker.check_model` on the result.

  Returns:
    An ``onnx.ModelProto``; its ``metadata_props`` name the int8 leaves
    (``ec2t_jax.ternary_leaves``) and the folded pairs (``ec2t_jax.folded_batch_norms``).

  Raises:
    ValueError: for an opset out of range, an input shape with a non-positive
      dimension, a named leaf that is missing or not ternary, or a floating leaf
      or computation that is not float32 (bfloat16, float16, float64).
    NotImplementedError: for a JAX primitive without a translation (named in the
      message), a slice of the batch dimension, or a computation that depends on
      the batch size (e.g. a mean over the batch).

  Example:
    >>> proto = to_onnx(model, variables, (32, 32, 3))  # doctest: +SKIP
    >>> import onnxruntime  # doctest: +SKIP
    >>> session = onnxruntime.InferenceSession(proto.SerializeToString())  # doctest: +SKIP
    >>> logits = session.run(None, {'images': x})[0]  # doctest: +SKIP
  """
  if not MIN_OPSET <= int(opset) <= MAX_OPSET:
    raise ValueError(f'opset must be in [{MIN_OPSET}, {MAX_OPSET}], got {opset}')
  input_shape = tuple(int(d) for d in input_shape)
  if not input_shape or any(d <= 0 for d in input_shape):
    raise ValueError(
      "input_shape must be one example's shape without the batch, e.g. (28, 28, 1), "
      f'got {input_shape}'
    )
  variables = jax.device_get(variables)
  named = tree_util.named_leaves(variables)
  flat = {name: np.asarray(value) for name, value in named}
  _check_float32(flat)
  if ternary_leaves is None:
    ternary_leaves = export_leaves.ternary_leaves(variables)
  tern = set(_check_ternary(flat, ternary_leaves))

  folds = folded_batch_norms(model, variables, input_shape) if fold_batch_norm else []
  treedef = jax.tree_util.tree_structure(variables)
  leaf_names = [name for name, _ in named] + [
    f'{f.conv}/{part}:folded' for f in folds for part in ('scale', 'bias')
  ]
  leaf_values = [flat[name] for name, _ in named] + [a for f in folds for a in (f.scale, f.bias)]
  n_vars = len(named)
  norms = {f.norm for f in folds}
  mean, std = (
    (None, None)
    if normalization is None
    else (
      np.asarray(normalization[0], np.float32),
      np.asarray(normalization[1], np.float32),
    )
  )

  def forward(x, *leaves):
    v = jax.tree_util.tree_unflatten(treedef, leaves[:n_vars])
    extra = leaves[n_vars:]
    fold_args = {f.conv: (extra[2 * i], extra[2 * i + 1]) for i, f in enumerate(folds)}
    if mean is not None:
      x = (x - mean) / std
    with _folding(fold_args, norms) if folds else contextlib.nullcontext():
      return model.apply(v, x, train=False)

  closed, twin = _trace(forward, input_shape, leaf_values)

  graph = _Graph(int(opset))
  tr = _Translator(graph, _TRACE_BATCHES)

  def lazy(name, value):
    if name in tern:
      return lambda: _ternary_kernel(graph, name, value)
    return lambda: graph.initializer(value, name)

  tr.bind(
    closed.jaxpr,
    twin.jaxpr,
    [INPUT_NAME] + [lazy(n, v) for n, v in zip(leaf_names, leaf_values, strict=True)],
  )
  outs = tr.walk(closed.jaxpr, twin.jaxpr, closed.consts, twin.consts)
  if len(outs) != 1:
    raise NotImplementedError(f'the model returns {len(outs)} arrays; ONNX export takes one')
  graph.nodes.append(helper.make_node('Identity', [outs[0]], [OUTPUT_NAME], name='output'))

  def value_info(name, var):
    dims = [BATCH_DIM if isinstance(d, _Batch) else d for d in tr.dims[var]]
    if any(isinstance(d, _Batch) and d.k != 1 for d in tr.dims[var]):
      raise NotImplementedError('an output dimension is a multiple of the batch size')
    return helper.make_tensor_value_info(name, _onnx_dtype(var.aval.dtype), dims)

  onnx_graph = helper.make_graph(
    graph.nodes,
    'ec2t_jax',
    [value_info(INPUT_NAME, closed.jaxpr.invars[0])],
    [value_info(OUTPUT_NAME, closed.jaxpr.outvars[0])],
    initializer=graph.initializers,
  )
  opsets = [helper.make_opsetid('', int(opset))]
  proto = helper.make_model(
    onnx_graph,
    opset_imports=opsets,
    producer_name='ec2t_jax',
    ir_version=helper.find_min_ir_version_for(opsets),
    doc_string='EC2T network (Marban et al., CVPR-W 2020); ternary kernels stored as int8',
  )
  from ec2t_jax import __version__

  proto.producer_version = __version__
  props = {
    'ec2t_jax.ternary_leaves': ternary_initializers(proto),
    'ec2t_jax.folded_batch_norms': [[f.conv, f.norm] for f in folds],
    **(metadata or {}),
  }
  helper.set_model_props(proto, {k: json.dumps(v) for k, v in props.items()})
  if check:
    onnx.checker.check_model(proto)
  return proto


def save(path: str, proto: Any) -> int:
  """Writes a model from `to_onnx` to ``path``; returns the file's size in bytes."""
  data = proto.SerializeToString()
  files.replace_file(path, data)  # A failed write leaves an old file whole.
  return len(data)
