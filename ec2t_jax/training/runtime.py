"""The trainer's runtime: devices, processes, the compilation cache, batches and signals.

What a training loop needs around its jitted step and has nothing to do with EC2T:
a backend that starts (`check_backend`), multi-host set-up (`initialize_distributed`),
the data-parallel mesh (`create_mesh`), JAX's persistent compilation cache
(`enable_compilation_cache`), global arrays from per-process batches (`to_global`),
batches produced in a background thread (`Prefetch`), and SIGTERM/Ctrl-C turned into a
checkpoint-and-stop flag (`Preemption`).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

__all__ = [
  'COMPILATION_CACHE_BYTES',
  'Preemption',
  'Prefetch',
  'check_backend',
  'create_mesh',
  'enable_compilation_cache',
  'initialize_distributed',
  'to_global',
]


# Size limit of the persistent compilation cache when `config.compilation_cache_dir`
# turns it on; the least recently used executables are evicted beyond it.
COMPILATION_CACHE_BYTES = 2 << 30


def check_backend() -> list[jax.Device]:
  """`jax.devices()`, or a one-line ValueError when JAX cannot start its backend.

  JAX reports a platform that is asked for (`JAX_PLATFORMS=cuda`) but cannot
  start with a bare `AssertionError` or a long `RuntimeError`.

  Raises:
    ValueError: naming `JAX_PLATFORMS` and the fix.
  """
  try:
    return jax.devices()
  except (RuntimeError, AssertionError) as e:
    platforms = os.environ.get('JAX_PLATFORMS') or jax.config.jax_platforms or ''
    detail = ' '.join(str(e).split())[:200] or 'no backend could be initialized'
    raise ValueError(
      f'JAX cannot start a backend for JAX_PLATFORMS={platforms!r} ({type(e).__name__}: '
      f'{detail}); install the jax plugin of that accelerator (e.g. pip install '
      "'jax[cuda12]'), or set JAX_PLATFORMS=cpu"
    ) from e


def enable_compilation_cache(path: str) -> str | None:
  """Points JAX's persistent compilation cache at `path` (`~` expanded), before any compile.

  A cache the user chose already (`$JAX_COMPILATION_CACHE_DIR` or
  `jax.config.update('jax_compilation_cache_dir', ...)`) is left as it is. Only
  compilations that take at least a second are stored, so a restart of a large
  model skips most of its compile time (`docs/benchmarks.md`, section 3).

  Args:
    path: the cache directory, or '' to leave the cache off.

  Returns:
    The cache directory in use, or None when there is none.
  """
  current = jax.config.jax_compilation_cache_dir
  if current or not path:
    return current or None
  path = os.path.expanduser(path)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_compilation_cache_max_size', COMPILATION_CACHE_BYTES)
  return path


def initialize_distributed(runtime) -> None:
  """`jax.distributed.initialize` for multi-host runs (`runtime.distributed`), once.

  Args:
    runtime: the run's `ec2t_jax.training.spec.RuntimeSpec`.
  """
  if not runtime.distributed or jax.distributed.is_initialized():
    return
  # On TPU pods and SLURM everything is detected; elsewhere name the coordinator.
  jax.distributed.initialize(
    coordinator_address=runtime.coordinator_address or None,
    num_processes=runtime.num_processes or None,
    process_id=runtime.process_id if runtime.process_id >= 0 else None,
  )
  if jax.process_count() > 1:
    # Set up the collectives now, while all processes are in step: the first
    # collective otherwise comes after compilation, and a process that lags
    # there by more than the handshake timeout (30 s with gloo) fails the run.
    multihost_utils.sync_global_devices('ec2t_jax:start')


def create_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
  """A one-axis (`'data'`) mesh over every device, or the first `num_devices` (one host)."""
  devices = jax.devices()
  if num_devices:
    if jax.process_count() > 1 or not 0 < num_devices <= len(devices):
      raise ValueError(
        f'config.num_devices must be in [1, {len(devices)}] on one host, got {num_devices}'
      )
    devices = devices[:num_devices]
  return jax.sharding.Mesh(np.array(devices), ('data',))


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, Any]:
  """This process's part of a batch as global arrays sharded on the leading axis."""
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
  }


class Prefetch:
  """Produces the next batches in a background thread while the device computes.

  `get_state()` is the wrapped iterator's state right after the last batch that
  was *consumed* (not produced), so a checkpoint resumes exactly there.
  `set_state()` must come before the first `next()`.
  """

  def __init__(self, iterator, depth: int = 2):
    self._it = iterator
    self._depth = depth
    self._queue = None
    self._state = iterator.get_state()

  def set_state(self, state) -> None:
    if self._queue is not None:
      raise RuntimeError('set_state() after iteration started')
    self._it.set_state(state)
    self._state = state

  def get_state(self):
    return self._state

  def _produce(self):
    try:
      while True:
        batch = next(self._it)
        self._queue.put((batch, self._it.get_state()))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer.
      self._queue.put((e, None))

  def __iter__(self):
    return self

  def __next__(self):
    if self._queue is None:
      self._queue = queue.Queue(maxsize=self._depth)
      threading.Thread(target=self._produce, daemon=True).start()
    batch, state = self._queue.get()
    if isinstance(batch, BaseException):
      raise batch
    self._state = state
    return batch


class Preemption:
  """Turns SIGTERM and Ctrl-C (SIGINT) into a flag the training loop checks after each step.

  On the flag the loop saves a checkpoint and returns, so the same command
  resumes bit for bit. A second Ctrl-C raises `KeyboardInterrupt` at once (the
  checkpoints already on disk stay intact). Outside the main thread signals
  are left alone.

  Attributes:
    requested: True once a signal asked the run to stop.
    signal_name: `'SIGTERM'` or `'SIGINT'`, the first signal received.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signal_name = ''
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    for signum in self.SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # Not the main thread: no signal handling.
        break
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt(f'second {name}: stopping at once')
    if not self.requested:
      self.signal_name = name
      more = ' (Ctrl-C again to stop at once)' if signum == signal.SIGINT else ''
      logging.warning('%s received: saving a checkpoint and stopping%s.', name, more)
    self.requested = True

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous = {}
