"""Test session setup: eight simulated CPU devices, and fast compilation.

Set before jax is imported anywhere; subprocesses started by tests inherit them, so a
command-line run and an in-process run of the same config compute the same bits.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The tests' programs are tiny: compile time dominates, so skip most XLA optimizations.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
