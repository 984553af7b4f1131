"""Counting multiply-accumulates from a model's traced computation (its jaxpr).

The forward pass of one input is traced to a jaxpr (nothing is compiled or run)
and every convolution contributes ``output elements × kernel height × kernel
width × input channels per group``, every dense layer ``output elements ×
contracted size``. BatchNorm, activations, pooling and residual additions are
not counted here (`ec2t_jax.scoring.count` counts everything).
"""

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ['count_macs', 'sub_jaxprs']


def sub_jaxprs(value: Any):
  """The jaxprs nested in an equation parameter (pjit, custom_jvp, cond, ...)."""
  if hasattr(value, 'eqns'):
    yield value
  elif hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from sub_jaxprs(v)


def _jaxpr_macs(jaxpr: Any) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      _, rhs_spec, _ = eqn.params['dimension_numbers']
      per_output = math.prod(rhs[d] for d in rhs_spec[1:])  # in-channels/group × kh × kw.
      total += math.prod(eqn.outvars[0].aval.shape) * per_output
    elif name == 'dot_general':
      lhs = eqn.invars[0].aval.shape
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
    for value in eqn.params.values():
      for sub in sub_jaxprs(value):
        total += _jaxpr_macs(sub)
  return total


def count_macs(model: Any, variables: Any, input_shape: Sequence[int]) -> int:
  """Multiply-accumulates of one eval-mode forward pass, from the traced jaxpr.

  Args:
    model: a linen module called as ``model.apply(variables, x, train=False)``.
    variables: its variables, or their ``jax.ShapeDtypeStruct``s.
    input_shape: the input, batch included, e.g. ``(1, 32, 32, 3)``.

  Returns:
    The sum over convolutions (``out elements·kh·kw·cin/groups``) and dense
    layers (``out elements·contracted size``).

  Example:
    >>> from ec2t_jax import models
    >>> model = models.create('resnet20', num_classes=10)
    >>> x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    >>> count_macs(model, jax.eval_shape(model.init, jax.random.key(0), x), x.shape)
    40551040
  """
  x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
  return _jaxpr_macs(closed.jaxpr)
