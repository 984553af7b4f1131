"""ec2t_jax: Entropy-Constrained Trained Ternarization for JAX, Flax and optax."""

__version__ = '0.1.0'
