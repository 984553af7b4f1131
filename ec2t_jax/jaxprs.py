"""Walking a model's traced computation (its jaxpr): nested jaxprs, calls, multiply-accumulates.

The one place in ec2t_jax that knows how jaxprs nest: `sub_jaxprs` finds the
jaxprs inside an equation's parameters (pjit, custom_jvp, cond, scan, ...),
`call_body` opens a call-like equation whose body maps its inputs and outputs
one to one, and `eqn_macs` counts the multiply-accumulates of one convolution
or dense equation. The tracer of `ec2t_jax.scoring`, the ternary evaluator of
`ec2t_jax.inference` and `count_macs` below all walk jaxprs with these.

`count_macs` traces the forward pass of one input to a jaxpr (nothing is
compiled or run) and sums, over every convolution, ``output elements × kernel
height × kernel width × input channels per group`` and, over every dense
layer, ``output elements × contracted size``. BatchNorm, activations, pooling
and residual additions are not counted here (`ec2t_jax.scoring.count` counts
everything; docs/scoring.md).
"""

import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ['CALLS', 'CASTS', 'call_body', 'count_macs', 'eqn_macs', 'has_sub_jaxpr', 'sub_jaxprs']

# Primitives whose sub-jaxpr is a plain function call: walking them means walking their body.
CALLS = frozenset(
  {
    'pjit',
    'jit',
    'closed_call',
    'core_call',
    'custom_jvp_call',
    'custom_vjp_call',
    'custom_vjp_call_jaxpr',
    'remat',
    'checkpoint',
  }
)
# Primitives that only change an array's dtype (or copy it): a cast kernel is still the kernel.
CASTS = frozenset({'convert_element_type', 'copy', 'copy_p'})


def _open(value: Any) -> tuple[Any, list[Any]] | None:
  """``(jaxpr, consts)`` of a `ClosedJaxpr` or a `Jaxpr` (no consts), else None."""
  if hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
    return value.jaxpr, list(getattr(value, 'consts', []))
  if hasattr(value, 'eqns'):
    return value, []
  return None


def sub_jaxprs(value: Any) -> Iterator[Any]:
  """The jaxprs nested in an equation parameter (pjit, custom_jvp, cond, ...), opened."""
  opened = _open(value)
  if opened is not None:
    yield opened[0]
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from sub_jaxprs(v)


def has_sub_jaxpr(eqn: Any) -> bool:
  """True if any parameter of ``eqn`` holds a jaxpr (calls and control flow)."""
  return any(True for value in eqn.params.values() for _ in sub_jaxprs(value))


def call_body(eqn: Any) -> tuple[Any, list[Any]] | None:
  """``(jaxpr, consts)`` of a call-like equation (`CALLS`) whose body maps one to one.

  The body's inputs and outputs must correspond to the equation's, so that
  walking the body stands for the equation. Anything else (control flow such as
  ``cond`` or ``scan``, and other primitives) gives None.
  """
  if eqn.primitive.name not in CALLS:
    return None
  for key in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    opened = _open(eqn.params.get(key))
    if opened is None:
      continue
    body = opened[0]
    if len(body.invars) == len(eqn.invars) and len(body.outvars) == len(eqn.outvars):
      return opened
  return None


def eqn_macs(eqn: Any) -> int:
  """Multiply-accumulates of one ``conv_general_dilated`` or ``dot_general`` equation, else 0.

  A convolution costs ``out elements·kh·kw·cin/groups``, a dot product
  ``out elements·contracted size``.
  """
  name = eqn.primitive.name
  if name == 'conv_general_dilated':
    rhs = eqn.invars[1].aval.shape
    _, rhs_spec, _ = eqn.params['dimension_numbers']
    per_output = math.prod(rhs[d] for d in rhs_spec[1:])  # in-channels/group × kh × kw.
  elif name == 'dot_general':
    lhs = eqn.invars[0].aval.shape
    (lhs_contract, _), _ = eqn.params['dimension_numbers']
    per_output = math.prod(lhs[d] for d in lhs_contract)
  else:
    return 0
  return math.prod(eqn.outvars[0].aval.shape) * per_output


def _jaxpr_macs(jaxpr: Any) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    total += eqn_macs(eqn)
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
