"""Compression methods: one protocol, one registry.

A compression method is one module that builds a `CompressionMethod`, modelled
on `optax.GradientTransformation`: a few functions and a NamedTuple state,
nothing else. Its `optimizer` is what the trainer builds for a pass; its
state views (`owns`, `kernels`, `layers`) are what `ec2t_jax.ternarize`,
`ec2t_jax.compressed_kernels`, `ec2t_jax.statistics` and the report read, so
none of them switches on a method's name or state type.

    method = ec2t_jax.methods.get('twn')
    tx = method.optimizer(settings, ternary_mask)          # an optax optimizer
    for m, state in ec2t_jax.methods.method_states(opt_state):
      m.layers(state, dtype_of)                          # {path: CompressedLayer}

The built-in methods are `'ec2t'` (EC2T, with ECP as its pruning;
`ec2t_jax.alias`), `'absmean'` (BitNet b1.58; `ec2t_jax.baselines`) and
`'twn'` (Ternary Weight Networks; `ec2t_jax.twn`). `register` adds others.

Example:
  >>> ec2t_jax.methods.names()
  ('ec2t', 'absmean', 'twn')
  >>> ec2t_jax.methods.get('absmean').can_prune
  False
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

__all__ = [
  'CompressedLayer',
  'CompressionMethod',
  'DtypeOf',
  'check_pruning',
  'get',
  'get_setting',
  'method_states',
  'names',
  'pruning_error',
  'read_settings',
  'register',
  'states_of',
  'unregister',
]

# `dtype_of(path)`: the dtype of the params leaf `path`; raises a ValueError for a
# path that the params lack (see `ec2t_jax.state_utils`).
DtypeOf = Callable[[str], Any]


class CompressedLayer(NamedTuple):
  """One compressed leaf as its method's state defines it (what statistics and reports read).

  Attributes:
    assignment: int8, the leaf's shape: 0 → `-w_n`, 1 → 0, 2 → `+w_p` (EC2T's symbols).
    w_p: float32 scalar, the positive level as placed in the network.
    w_n: float32 scalar, the magnitude of the negative level.
    latent: the full-precision latent weights `W`, the leaf's shape.
    lam: float32 scalar, the λ of the method's entropy term; None without one.
    pmf: float32 `(3,)`, the probabilities of the method's entropy term (EC2T's
      after the `p0_min` floor); None: only the empirical ones of `assignment` exist.
  """

  assignment: jax.Array
  w_p: jax.Array
  w_n: jax.Array
  latent: jax.Array
  lam: jax.Array | None = None
  pmf: jax.Array | None = None


class CompressionMethod(NamedTuple):
  """A compression method: how to train a network with it, and how to read its state.

  Attributes:
    name: the registry name (`config.method`).
    optimizer: `optimizer(settings, ternary_mask, *, prune_mask=None,
      fixed_mask=None, freeze_at=None) -> optax.GradientTransformation`, the
      optimizer of one compression pass. `settings` holds at least the keys of
      `settings` (a mapping such as `config.ec2t`, or an object with them as
      attributes; see `read_settings`); `ternary_mask`,
      `prune_mask` and `fixed_mask` are pytrees of bools (or `params -> pytree
      of bools`) as for `ec2t_jax.ec2t`; `freeze_at` is the first update of the
      frozen phase, or None. A method that cannot prune refuses a `prune_mask`
      (`check_pruning`). Call `ec2t_jax.ternarize(params, opt_state)` once
      after `init`: from then on the params are the compressed network.
    owns: `owns(x) -> bool`, True for (only) the method's own state objects
      inside an optimizer state; used as `is_leaf` to find them.
    kernels: `kernels(state, dtype_of) -> {path: kernel}`, the compressed
      leaves of one owned state, each in the dtype `dtype_of(path)` of its
      params leaf: what `ec2t_jax.ternarize` places into the params.
    layers: `layers(state, dtype_of) -> {path: CompressedLayer}`, the symbols,
      levels and latent weights of the same leaves, for statistics and reports.
    can_prune: whether `optimizer` takes a `prune_mask` (and so ecp stages).
    settings: the keys of `settings` that `optimizer` reads.
  """

  name: str
  optimizer: Callable[..., optax.GradientTransformation]
  owns: Callable[[Any], bool]
  kernels: Callable[[Any, DtypeOf], dict[str, jax.Array]]
  layers: Callable[[Any, DtypeOf], dict[str, CompressedLayer]]
  can_prune: bool = False
  settings: tuple[str, ...] = ()


# The built-in methods, in the order `names()` lists them: (module, attribute). They
# are imported on first use, since each module imports this one for the protocol.
_BUILTINS = (
  ('ec2t_jax.alias', 'EC2T'),
  ('ec2t_jax.baselines', 'ABSMEAN'),
  ('ec2t_jax.twn', 'TWN'),
)
_REGISTRY: dict[str, CompressionMethod] = {}
_loaded = False


def _registry() -> dict[str, CompressionMethod]:
  """The registry, with the built-in methods registered first (once)."""
  global _loaded
  if not _loaded:
    builtins = [getattr(importlib.import_module(m), a) for m, a in _BUILTINS]
    _REGISTRY.update({m.name: m for m in builtins})
    _loaded = True
  return _REGISTRY


def _quoted(values) -> str:
  """`'a', 'b'`: the values' reprs joined by commas."""
  return ', '.join(repr(v) for v in values)


def names() -> tuple[str, ...]:
  """The registered methods' names, built-ins first, then in order of registration."""
  return tuple(_registry())


def get(name: str, *, what: str = 'compression method') -> CompressionMethod:
  """The registered method `name`.

  Args:
    name: a registry name, e.g. `'ec2t'`.
    what: how the error names the value (e.g. `'config.method'`).

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  registry = _registry()
  if not isinstance(name, str) or name not in registry:
    raise ValueError(f'unknown {what} {name!r}; valid: {_quoted(registry)}')
  return registry[name]


def register(name: str, method: CompressionMethod, *, replace: bool = False) -> None:
  """Adds `method` to the registry as `name` (its `name` field is set to `name`).

  Args:
    name: the registry name (`config.method`), a non-empty string.
    method: the method.
    replace: replace a method already registered as `name` (False: refuse).

  Raises:
    TypeError: if `method` is not a `CompressionMethod`.
    ValueError: for an empty name, or a registered one without `replace=True`.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f'a compression method name must be a non-empty string, got {name!r}')
  if not isinstance(method, CompressionMethod):
    raise TypeError(
      f'register({name!r}, ...) needs an ec2t_jax.methods.CompressionMethod, got '
      f'{type(method).__name__}'
    )
  registry = _registry()
  if name in registry and not replace:
    raise ValueError(
      f'compression method {name!r} is already registered (registered: {_quoted(registry)}); '
      'pass replace=True to replace it'
    )
  registry[name] = method if method.name == name else method._replace(name=name)


def unregister(name: str) -> CompressionMethod:
  """Removes method `name` from the registry and returns it.

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  method = get(name)
  del _registry()[name]
  return method


def states_of(opt_state: optax.OptState, owns: Callable[[Any], bool]) -> list[Any]:
  """Every state inside `opt_state` for which `owns(state)` holds, in tree order."""
  return [x for x in jax.tree.leaves(opt_state, is_leaf=owns) if owns(x)]


def method_states(opt_state: optax.OptState) -> list[tuple[CompressionMethod, Any]]:
  """`(method, state)` for every state of a registered method inside `opt_state`, in tree order.

  A state owned by several registered methods is read by the first of them.
  """
  registered = tuple(_registry().values())

  def owner(x):
    return next((m for m in registered if m.owns(x)), None)

  leaves = jax.tree.leaves(opt_state, is_leaf=lambda x: owner(x) is not None)
  return [(m, x) for x in leaves if (m := owner(x)) is not None]


def _has_keys(settings: Any) -> bool:
  """Whether `settings` is read by key (a dict, a ConfigDict) rather than by attribute."""
  return hasattr(settings, 'keys') and hasattr(settings, '__getitem__')


def get_setting(settings: Any, key: str, default: Any = None) -> Any:
  """`settings[key]` of a mapping, or `settings.key` of an object (a dataclass), else `default`."""
  if _has_keys(settings):
    return settings[key] if key in settings else default
  return getattr(settings, key, default)


def read_settings(settings: Any, keys: tuple[str, ...], name: str) -> dict[str, Any]:
  """`{key: value}` of `keys` in `settings`, refusing settings that lack one.

  Args:
    settings: a mapping (a dict, an `ml_collections.ConfigDict`) or an object
      with the keys as attributes (a dataclass such as the trainer's
      `CompressionSettings`).
    keys: the keys to read.
    name: the method's name, for the error.

  Raises:
    ValueError: naming the missing keys and those the method reads.
  """
  if _has_keys(settings):
    missing = [k for k in keys if k not in settings]
  else:
    missing = [k for k in keys if not hasattr(settings, k)]
  if missing:
    raise ValueError(
      f'the {name!r} method needs the settings {_quoted(missing)}; it reads {_quoted(keys)}'
    )
  return {k: get_setting(settings, k) for k in keys}


def pruning_error(
  name: str, *, prune_pattern: str | None = None, ecp_stage: bool = False
) -> ValueError:
  """The error for method `name` (one that cannot prune) asked to prune.

  Args:
    name: the method's name.
    prune_pattern: the pattern of the leaves it was asked to prune, or None
      (a prune mask without a pattern).
    ecp_stage: it was asked to run an ecp (pruning-only) stage.

  Returns:
    A one-line `ValueError` naming the methods that can prune.
  """
  pruners = ' or '.join(f'config.method={n!r}' for n, m in _registry().items() if m.can_prune)
  if ecp_stage:
    return ValueError(
      f"an ecp stage prunes with EC2T's entropy constraint; config.method={name!r} has no such "
      f"stage: use kinds 'fp', 'ec2t' and 'frozen', or {pruners}"
    )
  asked = 'a prune_mask' if prune_pattern is None else f'prune_pattern={prune_pattern!r}'
  return ValueError(
    f'config.method={name!r} ternarizes only; it cannot prune ({asked}): use {pruners} or '
    "prune_pattern=''"
  )


def check_pruning(
  name: str, *, prune_pattern: str | None = None, ecp_stage: bool = False
) -> CompressionMethod:
  """Method `name`, refused if it cannot prune and is asked to.

  Args:
    name: a registry name (`config.method`).
    prune_pattern: the pattern of the leaves to prune ('' or None: none).
    ecp_stage: the method is asked to run an ecp (pruning-only) stage.

  Returns:
    The method (`get(name)`).

  Raises:
    ValueError: for an unknown name; for `ecp_stage` or a `prune_pattern` with
      a method whose `can_prune` is False (`pruning_error`).
  """
  method = get(name, what='config.method')
  if not method.can_prune and (ecp_stage or prune_pattern):
    raise pruning_error(name, prune_pattern=prune_pattern, ecp_stage=ecp_stage)
  return method
