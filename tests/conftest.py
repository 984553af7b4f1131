"""Test session setup: eight simulated CPU devices, fast compilation, a private cache.

Set before jax is imported anywhere; subprocesses started by tests inherit them, so a
command-line run and an in-process run of the same config compute the same bits.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The tests' programs are tiny: compile time dominates, so skip most XLA optimizations.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
# A persistent compilation cache of this session (not the user's ~/.cache): runs of
# main.py started by tests store every executable, and restarted ones load them, as
# a resumed training run does.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='ec2t_jax_xla_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
