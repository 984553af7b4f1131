"""Reading the EC2T state: place the ternary network into params, and summarize it.

The functions also read the state of the absmean baseline
(`ec2t_jax.baselines.absmean_ternary`), so the trainer, export and report treat
both methods alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ec2t_jax import baselines, ternary, transforms, tree_util


def compression_states(opt_state: optax.OptState) -> list[transforms.CompressionState]:
  """All `TernaryTrainingState` / `EntropyConstrainedPruningState` inside `opt_state`."""
  leaves = jax.tree.leaves(opt_state, is_leaf=transforms.is_compression_state)
  return [x for x in leaves if transforms.is_compression_state(x)]


def compressed_kernels(opt_state: optax.OptState, params: optax.Params) -> dict[str, jax.Array]:
  """`{path: kernel}` of every compressed leaf, as the state defines it, in the params' dtype.

  EC2T and ECP leaves from their assignment and centroids; leaves of the absmean
  baseline as `baselines.absmean_quantize` of their latent weights.
  """
  dtypes = tree_util.leaf_dtypes(params)
  out = {}
  for state in baselines.states(opt_state):
    for name, w in tree_util.flat_dict(state.latent, skip_masked=True).items():
      if name not in dtypes:
        raise ValueError(f'opt_state holds {name!r}, which is not a leaf of params')
      out[name] = baselines.absmean_quantize(w, state.quantizer_eps, dtypes[name])
  for state in compression_states(opt_state):
    prune = isinstance(state, transforms.EntropyConstrainedPruningState)
    latent = tree_util.flat_dict(state.latent, skip_masked=True)
    centroids = tree_util.flat_dict(state.centroids, skip_masked=True)
    for name, a in tree_util.flat_dict(state.assignment, skip_masked=True).items():
      if name not in dtypes:
        raise ValueError(f'opt_state holds {name!r}, which is not a leaf of params')
      if prune:
        out[name] = ternary.pruned_kernel(a, latent[name], dtypes[name])
      else:
        out[name] = ternary.ternary_kernel(a, centroids[name], dtypes[name])
  return out


def ternarize(params: optax.Params, opt_state: optax.OptState) -> optax.Params:
  """Returns `params` with every compressed leaf replaced by its kernel from `opt_state`.

  Call once after `tx.init(params)`; afterwards the ternary leaves hold only the
  values `{-w_n, 0, +w_p}` of the state, and `optax.apply_updates` keeps them so.

  Args:
    params: the params the optimizer was initialized with.
    opt_state: the state of `ec2t_jax.ec2t` (or of any composition containing
      `ternary_training` / `entropy_constrained_pruning`), or of
      `ec2t_jax.baselines.absmean_ternary`.

  Returns:
    A new params pytree of the same structure and dtypes.

  Raises:
    ValueError: if `opt_state` holds no EC2T state.
  """
  kernels = compressed_kernels(opt_state, params)
  if not kernels:
    raise ValueError(
      'opt_state holds no EC2T state; was it created by ec2t_jax.ec2t (or '
      'ec2t_jax.baselines.absmean_ternary)?'
    )

  def place(path, leaf):
    return kernels.get(tree_util.path_str(path), leaf)

  return jax.tree_util.tree_map_with_path(place, params)


def statistics(
  opt_state: optax.OptState, params: optax.Params | None = None
) -> dict[str, jax.Array]:
  """Per-layer and total EC2T statistics as arrays (usable inside `jit`).

  Keys: `'<path>/sparsity'` (fraction of zeros), `'/w_p'`, `'/w_n'`,
  `'/lambda'`, `'/entropy_bits'` (empirical entropy of the assignment, bits
  per weight), and totals `'total_sparsity'` (zeros over all compressed
  weights), `'num_compressed'`, `'entropy_bits'` (weighted mean). Leaves of the
  absmean baseline have `w_p = w_n = m` and no `'/lambda'`.

  Args:
    opt_state: the optimizer state (see `ternarize`).
    params: the params, or None. The absmean baseline's state holds float32
      latent weights only; its level `m` (and so its symbols) lies on the grid
      of the params leaf's dtype, which is read from `params` (float32 without).
      EC2T's statistics do not depend on it.

  Raises:
    ValueError: if `opt_state` holds a leaf that `params` lacks.
  """
  dtypes = {} if params is None else tree_util.leaf_dtypes(params)
  out = {}
  zeros = jnp.zeros((), jnp.float32)
  total = 0
  weighted_bits = jnp.zeros((), jnp.float32)
  for state in baselines.states(opt_state):
    for name, w in tree_util.flat_dict(state.latent, skip_masked=True).items():
      if params is not None and name not in dtypes:
        raise ValueError(f'opt_state holds {name!r}, which is not a leaf of params')
      dtype = dtypes.get(name, jnp.float32)
      a = baselines.absmean_assignment(w, state.quantizer_eps, dtype)
      cnt = ternary.counts(a)
      bits = ternary.entropy_bits(cnt / a.size)
      out[f'{name}/sparsity'] = cnt[ternary.ZERO] / a.size
      out[f'{name}/w_p'] = out[f'{name}/w_n'] = baselines.absmean_scale(w, dtype)
      out[f'{name}/entropy_bits'] = bits
      zeros = zeros + cnt[ternary.ZERO]
      weighted_bits = weighted_bits + bits * a.size
      total += a.size
  for state in compression_states(opt_state):
    centroids = tree_util.flat_dict(state.centroids, skip_masked=True)
    lam = tree_util.flat_dict(state.lam, skip_masked=True)
    for name, a in tree_util.flat_dict(state.assignment, skip_masked=True).items():
      cnt = ternary.counts(a)
      pmf = cnt / a.size
      bits = ternary.entropy_bits(pmf)
      out[f'{name}/sparsity'] = pmf[ternary.ZERO]
      out[f'{name}/w_p'] = centroids[name][0]
      out[f'{name}/w_n'] = centroids[name][1]
      out[f'{name}/lambda'] = lam[name]
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

  Pass `params` for the absmean baseline's levels in a non-float32 network
  (see `statistics`).

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
