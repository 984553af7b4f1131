"""Parameter and operation counts of a (ternary) network under the MicroNet challenge rules.

EC2T (Marban, Becking, Wiedemann & Samek, "Learning Sparse & Ternary Neural
Networks with Entropy-Constrained Trained Ternarization", CVPR Workshops 2020,
arXiv 2004.01077, §4 and docs/algorithm.md §10) reports every network's cost in the units
of the NeurIPS 2019 MicroNet challenge: parameters and operations in "32-bit
equivalents" (an item of ``b`` bits counts ``b/32``), and the score

    score = params / P_ref + flops / F_ref

with WRN-28-10 as the CIFAR reference (36.5M, 10.49G) and MobileNetV2-1.4 as
the ImageNet reference (6.9M, 1170M). ``docs/scoring.md`` gives the
rules in full.

Nothing here is tabulated per architecture. The package reads in this order:

* `tracer` (`trace`): one eval-mode forward pass (``model.apply(variables, x,
  train=False)``) becomes a jaxpr, walked once into a `Graph` (`graph`): every
  ``conv_general_dilated`` / ``dot_general`` whose kernel is a leaf of the
  variables is a `Layer`; BatchNorm and biases are the elementwise ops with a
  parameter operand (folded into the layer they follow, or standalone when they
  follow no layer); residual additions are additions of two activations;
  activations, pooling and the rest are the remaining ops on activations. The
  values of the variables then give each kernel's sparsity, dead channels and
  ternary structure. `jaxprs` holds the jaxpr walking shared with
  `ec2t_jax.inference` and `count_macs`.
* Two rule sets turn the graph into `Row`s (`costs` holds what they share):

  - `corrected` (``mode='corrected'``, the default) counts every operation of
    the network: a dead channel is an all-zero filter, and zero channels are
    followed through the true data flow (residual additions included); every
    residual addition, projection shortcut, pooling and activation counts; a
    ternary filter with ``n+`` positive and ``n-`` negative taps costs two
    adder trees (a true tree: ``m - 1`` additions for ``m`` values, widening by
    one bit per level) plus one addition and at most two multiplications per
    output; a BatchNorm scale that follows a ternary layer makes its two
    centroids per-channel values.
  - `reference` (``mode='reference'``) reproduces the published counter,
    quirks included: a dead channel is a filter that *sums* to zero, dead
    inputs are the dead outputs of the previous layer in the list of body
    convolutions (the residual path is ignored), only the last residual
    addition counts, 1x1 projection shortcuts, pooling and the classifier's
    ReLU are not counted, the tree adder starts at ``vl - 1`` and stops at
    ``n > 1`` with the layer's average vector length ``vl``, the output side is
    ``ceil(ceil(in/stride) + 2·pad - k + 1)``, and pyramidal (MicroNet) blocks
    charge their first BatchNorm and their single ReLU by the position of the
    convolution in that list. Scoring parameters are truncated to integers per
    group (stem, body, classifier), as published.

* `count` (below) ties them together into a `Report`; ``python -m
  ec2t_jax.scoring`` (`__main__`) prints one for a trained workdir.

Example:
  >>> from ec2t_jax import models, scoring
  >>> model = models.create('resnet20', num_classes=10)
  >>> x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)  # values: dense FP
  >>> r = scoring.count(model, variables, input_shape=(32, 32, 3), mode='reference',
  ...                   mul_bits=32, half_precision=False)
  >>> round(r.totals['mults'] / 1e6, 1), round(r.totals['adds'] / 1e6, 1)
  (40.7, 40.6)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ec2t_jax import models, tree_util
from ec2t_jax.jaxprs import count_macs
from ec2t_jax.scoring import corrected, costs, reference
from ec2t_jax.scoring.costs import Report, Row
from ec2t_jax.scoring.graph import Graph, Layer, Op
from ec2t_jax.scoring.tracer import batch_one, trace
from ec2t_jax.tree_util import is_ternary

__all__ = [
  'MODES',
  'REFERENCE_NETWORKS',
  'Graph',
  'Layer',
  'Op',
  'Report',
  'Row',
  'count',
  'count_macs',
  'count_run',
  'is_ternary',
  'reference_for',
  'trace',
]

MODES = ('corrected', 'reference')
_RULES = {'corrected': corrected, 'reference': reference}

# (P_ref, F_ref): WRN-28-10 for CIFAR-10/100, MobileNetV2-1.4 for ImageNet (docs/scoring.md).
REFERENCE_NETWORKS = {
  'cifar': (36.5e6, 10.49e9),
  'imagenet': (6.9e6, 1170e6),
}


def reference_for(dataset: str | None, input_shape: Sequence[int]) -> tuple[float, float] | None:
  """``(P_ref, F_ref)`` of the MicroNet score for a dataset name or an input size, or None.

  The MicroNet challenge defines a reference network for CIFAR (WRN-28-10) and
  for ImageNet (MobileNetV2-1.4) only. A dataset name containing ``'imagenet'``
  or ``'cifar'`` picks its reference; any other named dataset (MNIST, your
  own data) has none, and then the score is not defined. Without a name, the
  input size decides (ImageNet above 64 pixels, CIFAR otherwise).

  Example:
    >>> reference_for('cifar100', (32, 32, 3)), reference_for('mnist', (28, 28, 1))
    ((36500000.0, 10490000000.0), None)
  """
  if dataset:
    name = dataset.lower()
    if 'imagenet' in name:
      return REFERENCE_NETWORKS['imagenet']
    if 'cifar' in name:
      return REFERENCE_NETWORKS['cifar']
    return None
  side = batch_one(input_shape)[1]
  return REFERENCE_NETWORKS['imagenet' if side > 64 else 'cifar']


def _variables_dict(variables: Any) -> dict[str, Any]:
  if isinstance(variables, Mapping) and 'params' in variables:
    return {k: variables[k] for k in variables}
  return {'params': variables}


def _infer_num_classes(name: str, params: Any, shape: tuple[int, ...]) -> int:
  """The ``num_classes`` a registered model needs to have the shapes of ``params``."""
  probe = models.create(name, num_classes=1)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  ref = jax.eval_shape(lambda x: probe.init(jax.random.key(0), x, train=False), x)['params']
  got = tree_util.flat_dict(params)
  for leaf_name, leaf in tree_util.named_leaves(ref):
    mine = got.get(leaf_name)
    if mine is not None and np.shape(mine) != leaf.shape:
      diff = [a for a, b in zip(np.shape(mine), leaf.shape, strict=False) if a != b]
      if diff:
        return int(diff[-1])
  return 1


def count(
  model_name_or_module: Any,
  variables: Any,
  *,
  input_shape: Sequence[int] | None = None,
  mode: str = 'corrected',
  mul_bits: int = 16,
  add_bits: int = 32,
  storage_bits: int = 16,
  half_precision: bool = True,
  tree_adder: bool = True,
  ternary_mask: Any = None,
  dataset: str | None = None,
) -> Report:
  """Counts scoring parameters, multiplications and additions of a network (docs/scoring.md).

  Args:
    model_name_or_module: a registered model name (``models.names()``) or a
      linen module applied as ``model.apply(variables, x, train=False)``.
    variables: ``{'params': ..., 'batch_stats': ...}`` (or just the params).
      Arrays give sparsity, dead channels and ternary structure;
      ``jax.ShapeDtypeStruct`` leaves count as dense full-precision kernels.
    input_shape: one input, ``(H, W, C)`` (default: the registered model's).
    mode: ``'corrected'`` (every op counted right) or ``'reference'`` (the
      published counter's rules and quirks).
    mul_bits: width of a multiplication (a multiplication counts ``mul_bits/32``).
    add_bits: width of an accumulation (``add_bits/32``).
    storage_bits: width of a stored value when ``half_precision``.
    half_precision: store values (and start adder trees) at ``storage_bits``
      instead of 32 bits.
    tree_adder: count a ternary layer's additions as an adder tree that widens
      by one bit per level from ``b`` to 32 bits, instead of ``add_bits`` each.
    ternary_mask: pytree of bools mirroring the params; True marks a ternary
      kernel whatever its values. Kernels with values exactly ``{-a, 0, +b}``
      are ternary anyway.
    dataset: picks the score's reference network (``'cifar10'``,
      ``'cifar100'``, ``'imagenet2012'``, ...); without it the input size decides.

  Returns:
    A `Report`.

  Raises:
    ValueError: for an unknown mode, model name or dataset, bad bit widths, or
      an input shape that is not one ``(H, W, C)`` example.

  Example:
    >>> r = count('lenet5', variables, input_shape=(28, 28, 1))  # doctest: +SKIP
    >>> r.totals['params'], r.totals['flops'], r.totals['score']  # doctest: +SKIP
  """
  if mode not in MODES:
    raise ValueError(f'mode must be one of {list(MODES)}, got {mode!r}')
  for label, bits in (
    ('mul_bits', mul_bits),
    ('add_bits', add_bits),
    ('storage_bits', storage_bits),
  ):
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 64:
      raise ValueError(f'{label} must be an integer in [1, 64], got {bits!r}')
  variables = _variables_dict(variables)
  if isinstance(model_name_or_module, str):
    name = model_name_or_module
    shape = batch_one(input_shape if input_shape is not None else models.input_shape(name))
    num_classes = _infer_num_classes(name, variables['params'], shape)
    model = models.create(name, num_classes=num_classes)
  else:
    model = model_name_or_module
    if input_shape is None:
      raise ValueError('input_shape is required when a module (not a registered name) is given')
    shape = batch_one(input_shape)
  reference = reference_for(dataset, shape)
  graph = trace(model, variables, shape)
  if not graph.layers:
    raise ValueError('the traced forward pass has no convolution or dense layer with a kernel leaf')
  b = storage_bits if half_precision else 32
  marked = tree_util.selected_names(ternary_mask)
  ternary = {
    layer.index: layer.name in marked or (layer.kernel is not None and is_ternary(layer.kernel))
    for layer in graph.layers
  }
  for layer in graph.layers:
    if ternary[layer.index] and layer.kernel is None:
      raise ValueError(f'{layer.name} is marked ternary but its values are abstract; pass arrays')
  settings = dict(
    mul_bits=mul_bits,
    add_bits=add_bits,
    storage_bits=b,
    half_precision=half_precision,
    tree_adder=tree_adder,
    input_shape=shape,
    dataset=dataset,
  )
  rules = _RULES[mode]
  widths = costs.Widths(storage=b, mul=mul_bits, add=add_bits, tree=tree_adder)
  rows = rules.count_rows(graph, ternary, widths)
  totals = costs.totals(rows, rules.params_total)
  totals['macs'] = float(
    sum(math.prod(layer.shape_oi[1:]) * layer.c_out * layer.positions for layer in graph.layers)
  )
  if reference is None:  # No reference network fits this dataset: no score.
    totals['P_ref'] = totals['F_ref'] = totals['score'] = float('nan')
  else:
    p_ref, f_ref = reference
    totals['P_ref'], totals['F_ref'] = p_ref, f_ref
    totals['score'] = totals['params'] / p_ref + totals['flops'] / f_ref
  return Report(rows, totals, mode, settings, list(graph.warnings))


def count_run(
  run: Any, *, mode: str = 'corrected', image_size: int | None = None, **kwargs: Any
) -> Report:
  """`count` of a trained run read by `ec2t_jax.training.workdir.load_workdir`.

  The run's model, variables, image shape, ternary mask and dataset name go
  to `count`. A leaf of the run's ternary mask counts as ternary only if its
  values are (`tree_util.is_ternary`): a checkpoint of the full-precision
  stage, or a leaf that did not become ternary, is counted as full precision,
  and the report's warnings name those leaves.

  Args:
    run: a `ec2t_jax.training.workdir.Workdir`.
    mode: ``'corrected'`` or ``'reference'``.
    image_size: count at this input side instead of the run's image size
      (e.g. EfficientNet-B1 trained at 224, scored at 256).
    **kwargs: further `count` options (``mul_bits``, ``half_precision``, ...).

  Raises:
    ValueError: for an `image_size` that is not a positive integer.
  """
  input_shape = tuple(run.image_shape)
  if image_size is not None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
      raise ValueError(f'image_size must be a positive integer (pixels), got {image_size!r}')
    input_shape = (image_size, image_size, *input_shape[2:])
  params = tree_util.flat_dict(run.variables['params'])
  not_ternary = [
    name
    for name in sorted(tree_util.selected_names(run.ternary_mask))
    if not tree_util.is_ternary(params[name])
  ]
  mask = jax.tree_util.tree_map_with_path(
    lambda path, m: (
      bool(m) and tree_util.strip_collection(tree_util.path_str(path)) not in not_ternary
    ),
    run.ternary_mask,
  )
  report = count(
    run.model,
    run.variables,
    input_shape=input_shape,
    mode=mode,
    ternary_mask=mask,
    dataset=run.config.get('dataset'),
    **kwargs,
  )
  if not_ternary:
    report.warnings.insert(0, f'not ternary, counted as full precision: {", ".join(not_ternary)}')
  return report
