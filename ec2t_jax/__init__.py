"""ec2t_jax: Entropy-Constrained Trained Ternarization (EC2T) for JAX, Flax and optax.

    tx = ec2t_jax.ec2t(ec2t_jax.masks.default_ternary_mask, gamma=0.15, init_scale=0.3)
    opt_state = tx.init(params)
    params = ec2t_jax.ternarize(params, opt_state)   # params are now exactly ternary
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)     # still exactly ternary
    ec2t_jax.summarize(opt_state)

Other compression methods (the absmean and TWN baselines, or your own) share the
protocol and registry of `ec2t_jax.methods`: `ec2t_jax.methods.get('twn')`.

Reference: Marban et al., CVPR Workshops 2020, arXiv:2004.01077.
"""

from ec2t_jax import distill, masks, methods, ternary
from ec2t_jax.alias import default_fp_optimizer, ec2t, param_labels
from ec2t_jax.baselines import absmean_ternary
from ec2t_jax.distill import distillation_loss
from ec2t_jax.masks import default_ternary_mask
from ec2t_jax.state_utils import (
  compressed_kernels,
  compression_states,
  statistics,
  summarize,
  ternarize,
)
from ec2t_jax.transforms import (
  EntropyConstrainedPruningState,
  LayerGroup,
  LayerLayout,
  ResetAtStepState,
  TernaryTrainingState,
  entropy_constrained_pruning,
  reset_at_step,
  ternary_training,
)
from ec2t_jax.twn import twn_ternary

__version__ = '0.1.0'

# Subpackages that need more than jax and optax (flax, orbax, matplotlib, ...) load on
# first use, so `import ec2t_jax` stays light and `ec2t_jax.export.load(...)` still works.
_LAZY_SUBMODULES = (
  'export',
  'inference',
  'jaxprs',
  'models',
  'onnx_export',
  'report',
  'scoring',
  'training',
)


def __getattr__(name: str):
  """Imports the subpackages of `_LAZY_SUBMODULES` on first attribute access."""
  if name in _LAZY_SUBMODULES:
    import importlib

    return importlib.import_module(f'ec2t_jax.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
  'EntropyConstrainedPruningState',
  'LayerGroup',
  'LayerLayout',
  'ResetAtStepState',
  'TernaryTrainingState',
  'absmean_ternary',
  'compressed_kernels',
  'compression_states',
  'default_fp_optimizer',
  'default_ternary_mask',
  'distill',
  'distillation_loss',
  'ec2t',
  'entropy_constrained_pruning',
  'masks',
  'methods',
  'param_labels',
  'reset_at_step',
  'statistics',
  'summarize',
  'ternarize',
  'ternary',
  'ternary_training',
  'twn_ternary',
]
