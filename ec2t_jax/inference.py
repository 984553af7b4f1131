"""Ternary layers evaluated the way EC2T counts them: two accumulations, two products.

EC2T (Marban, Becking, Wiedemann & Samek, CVPR Workshops 2020, arXiv
2004.01077, §4; also Zhu et al., "Trained Ternary Quantization", ICLR 2017)
counts a ternary layer as additions plus two multiplications per output: with
the kernel ``q = w_p·A - w_n·B`` (``A`` and ``B`` the 0/1 masks of the
positive and negative weights),

    q ⊛ x = w_p · (A ⊛ x) - w_n · (B ⊛ x),

where ``A ⊛ x`` only adds up the inputs that ``A`` selects (docs/scoring.md, rules 4
and 5, counts exactly these operations). `ternary_conv` and
`ternary_dot_general` compute exactly this; `apply` runs a whole model's
eval-mode forward pass with every ternary layer evaluated this way and every
other operation unchanged, by interpreting the model's traced jaxpr.

This is a reference path for checking the arithmetic, not a fast one: the
accumulations are expressed as convolutions / matmuls with 0/1 kernels, which
XLA executes as ordinary multiply-accumulates, and the layer runs twice. It
makes no speed or energy claim.

Example:
  >>> out = apply(model, variables, x)  # doctest: +SKIP
  >>> dense = model.apply(variables, x, train=False)  # doctest: +SKIP
  >>> np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-5)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from ec2t_jax import jaxprs, tree_util

__all__ = [
  'TernaryKernel',
  'apply',
  'decompose',
  'ternary_conv',
  'ternary_dot_general',
  'ternary_forward',
]

_CONV_KEYS = (
  'window_strides',
  'padding',
  'lhs_dilation',
  'rhs_dilation',
  'dimension_numbers',
  'feature_group_count',
  'batch_group_count',
  'precision',
  'preferred_element_type',
)


class TernaryKernel(NamedTuple):
  """A ternary kernel ``q = w_p·pos - w_n·neg``.

  Attributes:
    pos: bool mask of the positive weights (the kernel's shape).
    neg: bool mask of the negative weights.
    w_p: the positive value (scalar).
    w_n: the magnitude of the negative value (scalar, >= 0).
  """

  pos: jax.Array
  neg: jax.Array
  w_p: jax.Array
  w_n: jax.Array


def decompose(kernel: jax.typing.ArrayLike) -> TernaryKernel:
  """Splits a kernel with values ``{-w_n, 0, +w_p}`` into its masks and values.

  Raises:
    ValueError: if the kernel is not floating point, or holds a non-finite
      value or more than one positive or negative value.

  Example:
    >>> decompose(np.array([0.5, 0.0, -0.25])).w_n
    Array(0.25, dtype=float32)
  """
  k = np.asarray(kernel)
  levels = tree_util.ternary_levels(k)
  if levels is None:
    if k.dtype.kind != 'f' and k.dtype.name != 'bfloat16':
      raise ValueError(f'kernel is not ternary: {k.dtype} values are not floating point')
    pos, neg = np.unique(k[k > 0]), np.unique(k[k < 0])
    raise ValueError(
      f'kernel is not ternary: {pos.size} distinct positive and {neg.size} distinct negative '
      'values (expected at most one of each)'
    )
  w_p, w_n = (jnp.asarray(np.asarray(level, k.dtype)) for level in levels)
  return TernaryKernel(jnp.asarray(k > 0), jnp.asarray(k < 0), w_p, w_n)


def _combine(s_pos: jax.Array, s_neg: jax.Array, t: TernaryKernel) -> jax.Array:
  dtype = s_pos.dtype
  return t.w_p.astype(dtype) * s_pos - t.w_n.astype(dtype) * s_neg


def ternary_conv(x: jax.Array, kernel: TernaryKernel, **conv_params: Any) -> jax.Array:
  """``lax.conv_general_dilated(x, q, **conv_params)`` as ``w_p·(A ⊛ x) - w_n·(B ⊛ x)``.

  Args:
    x: the input.
    kernel: the `TernaryKernel` of ``q`` (masks in ``q``'s layout).
    **conv_params: ``window_strides``, ``padding`` and any further argument of
      `jax.lax.conv_general_dilated`.

  Returns:
    The convolution, equal to the dense one up to floating-point summation order.
  """
  dtype = x.dtype
  s_pos = lax.conv_general_dilated(x, kernel.pos.astype(dtype), **conv_params)
  s_neg = lax.conv_general_dilated(x, kernel.neg.astype(dtype), **conv_params)
  return _combine(s_pos, s_neg, kernel)


def ternary_dot_general(
  x: jax.Array,
  kernel: TernaryKernel,
  dimension_numbers: Any,
  *,
  kernel_is_rhs: bool = True,
  **dot_params: Any,
) -> jax.Array:
  """``lax.dot_general`` with a ternary operand, as two accumulations and two products.

  Args:
    x: the activation operand.
    kernel: the `TernaryKernel` of the other operand.
    dimension_numbers: as for `jax.lax.dot_general`, for ``(x, q)`` when
      ``kernel_is_rhs`` else for ``(q, x)``.
    kernel_is_rhs: the kernel is the right operand (``x @ q``, as in `flax.linen.Dense`).
    **dot_params: ``precision``, ``preferred_element_type``.

  Returns:
    The product, equal to the dense one up to floating-point summation order.
  """
  dtype = x.dtype

  def dot(mask):
    m = mask.astype(dtype)
    args = (x, m) if kernel_is_rhs else (m, x)
    return lax.dot_general(*args, dimension_numbers, **dot_params)

  return _combine(dot(kernel.pos), dot(kernel.neg), kernel)


def _eval(
  jaxpr: Any,
  consts: list[Any],
  args: list[Any],
  names: list[str | None],
  kernels: Mapping[str, TernaryKernel],
  used: set[str],
) -> list[Any]:
  """Evaluates a jaxpr, replacing convs/matmuls whose kernel is a ternary leaf."""
  env: dict[Any, Any] = {}
  leaf: dict[Any, str] = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  for v, c in zip(jaxpr.constvars, consts, strict=True):
    env[v] = c
  for v, a, n in zip(jaxpr.invars, args, names, strict=True):
    env[v] = a
    if n is not None:
      leaf[v] = n
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    in_names = [leaf.get(v) if not isinstance(v, jcore.Literal) else None for v in eqn.invars]
    name = eqn.primitive.name
    body = jaxprs.call_body(eqn)
    if body is not None:
      outs = _eval(*body, invals, in_names, kernels, used)
    elif name == 'conv_general_dilated' and in_names[1] in kernels:
      params = {k: eqn.params[k] for k in _CONV_KEYS if k in eqn.params}
      outs = [ternary_conv(invals[0], kernels[in_names[1]], **params)]
      used.add(in_names[1])
    elif name == 'dot_general' and (in_names[1] in kernels or in_names[0] in kernels):
      rhs = in_names[1] in kernels
      k_name = in_names[1] if rhs else in_names[0]
      params = {
        k: eqn.params[k] for k in ('precision', 'preferred_element_type') if k in eqn.params
      }
      x = invals[0] if rhs else invals[1]
      outs = [
        ternary_dot_general(
          x, kernels[k_name], eqn.params['dimension_numbers'], kernel_is_rhs=rhs, **params
        )
      ]
      used.add(k_name)
    else:
      bind_params = eqn.primitive.get_bind_params(eqn.params)
      subfuns = []
      if isinstance(bind_params, tuple):  # Older JAX: (subfuns, params).
        subfuns, bind_params = bind_params
      result = eqn.primitive.bind(*subfuns, *invals, **bind_params)
      outs = result if eqn.primitive.multiple_results else [result]
    for v, out in zip(eqn.outvars, outs, strict=True):
      env[v] = out
    if name in jaxprs.CASTS and in_names[0] is not None:
      leaf[eqn.outvars[0]] = in_names[0]  # The kernel cast to the compute dtype.
  return [read(v) for v in jaxpr.outvars]


def ternary_forward(
  model: Any,
  variables: Mapping[str, Any],
  *,
  input_shape: tuple[int, ...],
  ternary_mask: Any = None,
) -> Callable[[jax.Array], jax.Array]:
  """A jitted ``x -> logits`` of ``model`` in eval mode with its ternary layers decomposed.

  Args:
    model: a linen module applied as ``model.apply(variables, x, train=False)``.
    variables: ``{'params': ..., 'batch_stats': ...}`` with concrete values.
    input_shape: the shape of ``x``, batch included.
    ternary_mask: optional pytree of bools mirroring the params; True leaves
      must be ternary. Without it every params leaf of two or more dimensions
      whose values are ``{-a, 0, +b}`` is evaluated the ternary way.

  Returns:
    The function; its attribute ``ternary_layers`` lists the kernel paths it
    evaluates as two accumulations.

  Raises:
    ValueError: if a masked leaf is not ternary.
  """
  named = tree_util.named_leaves(variables)
  names = [name for name, _ in named]
  leaves = [leaf for _, leaf in named]
  marked = {f'params/{name}' for name in tree_util.selected_names(ternary_mask)}
  kernels = {}
  for name, leaf in named:
    value = np.asarray(jax.device_get(leaf))
    if name in marked or (
      ternary_mask is None
      and name.startswith('params/')
      and value.ndim >= 2
      and tree_util.is_ternary(value)
    ):
      try:
        kernels[name] = decompose(value)
      except ValueError as e:
        raise ValueError(f'{name}: {e}') from e
  x_spec = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x_spec)
  used: set[str] = set()

  def run(leaves, kernels, x):
    (out,) = _eval(closed.jaxpr, list(closed.consts), [*leaves, x], [*names, None], kernels, used)
    return out

  jitted = jax.jit(run)

  def forward(x: jax.Array) -> jax.Array:
    return jitted(leaves, kernels, x)

  jax.eval_shape(run, leaves, kernels, x_spec)  # Fills `used`.
  forward.ternary_layers = sorted(n[len('params/') :] for n in used)
  return forward


def apply(
  model: Any, variables: Mapping[str, Any], x: jax.Array, *, ternary_mask: Any = None
) -> jax.Array:
  """``model.apply(variables, x, train=False)`` with ternary layers as two accumulations.

  See `ternary_forward`; this builds it for ``x.shape`` and calls it once.
  """
  x = jnp.asarray(x)
  return ternary_forward(model, variables, input_shape=x.shape, ternary_mask=ternary_mask)(x)
