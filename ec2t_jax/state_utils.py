"""Reading the compression state: place the compressed network into params, and summarize it.

The functions read the state of every registered compression method
(`ec2t_jax.methods`: EC2T and ECP, the absmean and TWN baselines, and any method
registered later) through the method's own state views, so the trainer,
export and report treat all methods alike.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ec2t_jax import methods, ternary, transforms, tree_util


def compression_states(opt_state: optax.OptState) -> list[Any]:
  """All states of registered compression methods inside `opt_state`, in tree order.

  `TernaryTrainingState` / `EntropyConstrainedPruningState` for EC2T, and the
  baselines' states (see `ec2t_jax.methods.method_states` for their methods).
  """
  return [state for _, state in methods.method_states(opt_state)]


def _dtype_of(params: optax.Params | None) -> methods.DtypeOf:
  """`dtype_of(path)` for the method views: the params leaf's dtype (float32 without params).

  With params, a path they lack is a ValueError.
  """
  if params is None:
    return lambda name: jnp.float32
  dtypes = tree_util.leaf_dtypes(params)

  def dtype_of(name: str):
    if name not in dtypes:
      raise ValueError(f'opt_state holds {name!r}, which is not a leaf of params')
    return dtypes[name]

  return dtype_of


def compressed_kernels(opt_state: optax.OptState, params: optax.Params) -> dict[str, jax.Array]:
  """`{path: kernel}` of every compressed leaf, as the state defines it, in the params' dtype.

  EC2T and ECP leaves from their assignment and centroids; leaves of the
  latent-weight baselines (absmean, TWN) as their quantizer of the latent
  weights: each method's `kernels` view (`ec2t_jax.methods`).

  Raises:
    ValueError: if `opt_state` holds a leaf that `params` lacks, or a kernel
      whose shape is not that of its params leaf.
  """
  dtype_of = _dtype_of(params)
  out = {}
  for method, state in methods.method_states(opt_state):
    out.update(method.kernels(state, dtype_of))
  shapes = {name: tuple(jnp.shape(leaf)) for name, leaf in tree_util.named_leaves(params)}
  for name, kernel in out.items():
    if name in shapes and tuple(jnp.shape(kernel)) != shapes[name]:
      raise ValueError(
        f'params leaf {name!r} has shape {shapes[name]}, but opt_state holds a kernel of shape '
        f'{tuple(jnp.shape(kernel))} for it: the state was built for other params; call '
        'tx.init(params) on these params'
      )
  return out


def ternarize(params: optax.Params, opt_state: optax.OptState) -> optax.Params:
  """Returns `params` with every compressed leaf replaced by its kernel from `opt_state`.

  Call once after `tx.init(params)`; afterwards the ternary leaves hold only the
  values `{-w_n, 0, +w_p}` of the state, and `optax.apply_updates` keeps them so.

  Args:
    params: the params the optimizer was initialized with.
    opt_state: the state of `ec2t_jax.ec2t` (or of any composition containing
      `ternary_training` / `entropy_constrained_pruning`), or of another
      registered method's optimizer (`ec2t_jax.baselines.absmean_ternary`,
      `ec2t_jax.twn.twn_ternary`, ...).

  Returns:
    A new params pytree of the same structure and dtypes.

  Raises:
    ValueError: if `opt_state` holds no state of a registered method, or a
      kernel whose shape is not that of its params leaf.
  """
  kernels = compressed_kernels(opt_state, params)
  if not kernels:
    raise ValueError(
      'opt_state holds no EC2T state (nor one of another registered method: '
      f'{", ".join(map(repr, methods.names()))}); was it created by ec2t_jax.ec2t or a '
      "method's optimizer (ec2t_jax.methods.get(name).optimizer)?"
    )

  def place(path, leaf):
    return kernels.get(tree_util.path_str(path), leaf)

  return jax.tree_util.tree_map_with_path(place, params)


def statistics(
  opt_state: optax.OptState, params: optax.Params | None = None
) -> dict[str, jax.Array]:
  """Per-layer and total statistics of the compressed leaves as arrays (usable inside `jit`).

  Keys: `'<path>/sparsity'` (fraction of zeros), `'/w_p'`, `'/w_n'`,
  `'/lambda'`, `'/entropy_bits'` (empirical entropy of the assignment, bits
  per weight), and totals `'total_sparsity'` (zeros over all compressed
  weights), `'num_compressed'`, `'entropy_bits'` (weighted mean). Leaves of
  the latent-weight baselines (absmean, TWN) have `w_p = w_n = m` and no
  `'/lambda'` (no entropy term). Each method's `layers` view gives the
  symbols and levels (`ec2t_jax.methods`).

  Args:
    opt_state: the optimizer state (see `ternarize`).
    params: the params, or None. A baseline's state holds float32 latent
      weights only; its level `m` (and so its symbols) lies on the grid of the
      params leaf's dtype, which is read from `params` (float32 without).
      EC2T's statistics do not depend on it.

  Raises:
    ValueError: if a baseline's `opt_state` holds a leaf that `params` lacks.
  """
  dtype_of = _dtype_of(params)
  out = {}
  zeros = jnp.zeros((), jnp.float32)
  total = 0
  weighted_bits = jnp.zeros((), jnp.float32)
  for method, state in methods.method_states(opt_state):
    for name, layer in method.layers(state, dtype_of).items():
      a = layer.assignment
      cnt = ternary.counts(a)
      pmf = cnt / a.size
      bits = ternary.entropy_bits(pmf)
      out[f'{name}/sparsity'] = pmf[ternary.ZERO]
      out[f'{name}/w_p'] = layer.w_p
      out[f'{name}/w_n'] = layer.w_n
      if layer.lam is not None:
        out[f'{name}/lambda'] = layer.lam
      out[f'{name}/entropy_bits'] = bits
      zeros = zeros + cnt[ternary.ZERO]
      weighted_bits = weighted_bits + bits * a.size
      total += a.size
  out['total_sparsity'] = zeros / max(total, 1)
  out['num_compressed'] = jnp.asarray(total, jnp.float32)
  out['entropy_bits'] = weighted_bits / max(total, 1)
  return out


def summarize(opt_state: optax.OptState, params: optax.Params | None = None) -> dict[str, float]:
  """`statistics(opt_state, params)` as Python floats, for logging and reports.

  Pass `params` for a baseline's levels (absmean, TWN) in a non-float32
  network (see `statistics`).

  Example:
    >>> summary = summarize(opt_state)  # doctest: +SKIP
    >>> summary['total_sparsity']       # doctest: +SKIP
    0.91
  """
  return {k: float(np.asarray(v)) for k, v in jax.device_get(statistics(opt_state, params)).items()}


def with_update_count(opt_state: optax.OptState, count: int) -> optax.OptState:
  """`opt_state` with the update counters of EC2T's own transformations set to `count`.

  The counters of `ternary_training`, `entropy_constrained_pruning` and
  `reset_at_step` decide when the assignment freezes (`freeze_assignment_at`)
  and when optimizers restart; Adam's own bias-correction counters are left
  alone. Setting them to `freeze_assignment_at` makes the next update the
  first of the frozen phase, e.g. to start that phase from an earlier (best)
  checkpoint of the EC2T phase, as the original does.

  Example:
    >>> import ec2t_jax, jax.numpy as jnp
    >>> params = {'w': jnp.linspace(-1, 1, 8)}
    >>> tx = ec2t_jax.ec2t({'w': True}, freeze_assignment_at=100)
    >>> state = with_update_count(tx.init(params), 100)
    >>> [int(s.count) for s in compression_states(state)]
    [100]
  """

  def is_counted(x):
    return transforms.is_compression_state(x) or isinstance(x, transforms.ResetAtStepState)

  def replace(x):
    if is_counted(x):
      return x._replace(count=jnp.full_like(x.count, count))
    return x

  return jax.tree.map(replace, opt_state, is_leaf=is_counted)
