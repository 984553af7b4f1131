"""The training program: data, input pipeline, trainer, checkpoints, metrics, workdirs.

Imports flax, orbax, grain and tfds; the optimizer (`import ec2t_jax`) does not.
"""
