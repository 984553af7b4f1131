"""Reading a run back from its workdir: its config, checkpoints and compression masks."""

from ec2t_jax.training.train import Workdir, config_from_workdir, load_workdir

__all__ = ['Workdir', 'config_from_workdir', 'load_workdir']
