"""The workdir lock: one run at a time per workdir, and a stale lock taken over safely.

`WorkdirLock(workdir).acquire()` holds an `fcntl.flock` on `workdir/lock` (released by the
kernel however the holder dies) and writes who holds it into the file; the trainer and the
sweep claim their workdirs with it (`ec2t_jax.training.workdir.claim_workdir`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
import sys
import threading
import time
from typing import Any

__all__ = [
  'HEARTBEAT_SECONDS',
  'LOCK_FILE',
  'STALE_LOCK_SECONDS',
  'WorkdirBusyError',
  'WorkdirLock',
]


LOCK_FILE = 'lock'


# The holder touches its lock file this often; a lock of another host that has not been
# touched for STALE_LOCK_SECONDS is taken over (its run died without releasing it).
HEARTBEAT_SECONDS = 30.0


STALE_LOCK_SECONDS = 600.0


def _boot_id() -> str:
  try:
    with open('/proc/sys/kernel/random/boot_id') as f:
      return f.read().strip()
  except OSError:
    return ''


def _process_start(pid: int) -> str:
  """The start time of process `pid` in clock ticks since boot ('' where /proc is missing)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return ''


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Another user's process.
    return True
  except (OSError, OverflowError, ValueError):
    return False
  return True


class WorkdirBusyError(ValueError):
  """The workdir is held by another live run (a ValueError: `main.py` prints one line)."""


class WorkdirLock:
  """An exclusive lock on a workdir: `workdir/lock` names its holder.

  The lock is an `fcntl.flock` on the file (released by the kernel when the
  holder dies, however it dies) plus, in the file, who holds it: pid, host,
  boot id, start time and command. A second run is refused at once with a
  one-line `WorkdirBusyError` naming the holder. A lock file left by a process
  that is gone (same host and the pid no longer runs, or another boot, or
  another host that has not touched the file for `STALE_LOCK_SECONDS`) is taken
  over with a warning; on filesystems without `flock` the file alone decides.
  While held, a daemon thread touches the file every `HEARTBEAT_SECONDS`.
  `release()` (also on `with` exit) removes the file.

  Args:
    workdir: the run's directory (it must exist).
    info: extra facts recorded for the holder (e.g. the coordinator address).
  """

  def __init__(self, workdir: str, **info: Any):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._info = info
    self._fd: int | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  @staticmethod
  def read_holder(path: str) -> dict[str, Any]:
    """The holder recorded in lock file `path`; `{}` if none, unreadable or malformed.

    A record is well formed when it is a JSON object with a positive integer
    `pid` and a string `host` (what `_write` records); anything else (`"abc"`,
    `[5]`, pid 0, a pid given as a string) names no process.
    """
    try:
      with open(path, encoding='utf-8') as f:
        value = json.loads(f.read() or '{}')
    except (OSError, ValueError):
      return {}
    if not isinstance(value, dict):
      return {}
    pid = value.get('pid')
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
      return {}
    return value if isinstance(value.get('host'), str) else {}

  def _malformed(self) -> str:
    """The lock file's content when it holds something but no valid holder, else ''."""
    try:
      with open(self.path, encoding='utf-8', errors='replace') as f:
        text = f.read(200).strip()
    except OSError:
      return ''
    return ' '.join(text.split())[:80] if text and not self.read_holder(self.path) else ''

  def _describe(self, holder: dict[str, Any]) -> str:
    if not holder:
      return 'another process (the lock file names none)'
    command = holder.get('command') or '?'
    return (
      f'pid {holder.get("pid")} on host {holder.get("host")!r} (started '
      f'{holder.get("started")}: {command[:120]})'
    )

  def _holder_gone(self, holder: dict[str, Any]) -> str:
    """Why the recorded holder no longer runs, or '' if it may still run."""
    if not holder:
      return 'empty lock file'
    if holder.get('host') == socket.gethostname():
      pid = int(holder.get('pid', -1))
      if holder.get('boot_id') and _boot_id() and holder['boot_id'] != _boot_id():
        return 'the machine has rebooted since'
      if not _pid_alive(pid):
        return f'pid {pid} no longer runs'
      start = _process_start(pid)
      if holder.get('process_start') and start and start != holder['process_start']:
        return f'pid {pid} is now another process'
      return ''
    try:
      age = time.time() - os.stat(self.path).st_mtime
    except OSError:
      return 'the lock file vanished'
    if age > STALE_LOCK_SECONDS:
      return f'its lock was last refreshed {age:.0f} s ago'
    return ''

  def _open(self) -> int:
    """The lock file's descriptor, created if needed; a symlink or non-file is refused.

    The lock is opened with `O_NOFOLLOW`, so a symlink planted at `workdir/lock`
    never lets the program write into a file outside the workdir.

    Raises:
      ValueError: naming the path, when it is a symlink or not a regular file.
    """
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
      if e.errno == errno.ELOOP or os.path.islink(self.path):
        raise ValueError(
          f'workdir lock {self.path!r} is a symlink (to {os.readlink(self.path)!r}); the '
          'program never writes through one: delete it and rerun'
        ) from None
      if e.errno == errno.EISDIR:
        raise ValueError(
          f'workdir lock {self.path!r} is a directory, not a regular file; delete it and rerun'
        ) from None
      raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
      os.close(fd)
      raise ValueError(f'workdir lock {self.path!r} is not a regular file; delete it and rerun')
    return fd

  def acquire(self) -> WorkdirLock:
    """Takes the lock, or raises `WorkdirBusyError` naming the live holder.

    Returns:
      self, holding the lock.
    """
    for _ in range(10):  # Retries only while another process removes the file under us.
      fd = self._open()
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        raise WorkdirBusyError(self._busy(self.read_holder(self.path))) from None
      except OSError:  # No flock on this filesystem: the file's content decides alone.
        pass
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if not same:  # Released (unlinked) between our open and flock: try the new file.
        os.close(fd)
        continue
      holder = self.read_holder(self.path)
      if holder:
        gone = self._holder_gone(holder)
        if not gone:
          os.close(fd)
          raise WorkdirBusyError(self._busy(holder))
        logging.warning(
          'workdir %r: taking over the lock of %s: %s', self.workdir, self._describe(holder), gone
        )
      elif self._malformed():
        logging.warning(
          'workdir %r: taking over the lock file, which names no process (it holds %r, not a '
          'record with a positive integer pid and a host)',
          self.workdir,
          self._malformed(),
        )
      self._fd = fd
      self._write()
      self._thread = threading.Thread(target=self._heartbeat, daemon=True, name='workdir-lock')
      self._thread.start()
      return self
    raise WorkdirBusyError(f'workdir {self.workdir!r}: its lock file keeps changing; retry')

  def _busy(self, holder: dict[str, Any]) -> str:
    hint = ''
    if holder and holder.get('host') != socket.gethostname():
      hint = f' (if that run is gone, delete {self.path!r})'
    return (
      f'workdir {self.workdir!r} is in use by {self._describe(holder)}{hint}; wait for that run '
      'to end or stop it, or pass another --workdir'
    )

  def _write(self) -> None:
    holder = {
      'pid': os.getpid(),
      'host': socket.gethostname(),
      'boot_id': _boot_id(),
      'process_start': _process_start(os.getpid()),
      'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
      'command': ' '.join(sys.argv),
      **self._info,
    }
    data = json.dumps(holder, sort_keys=True).encode('utf-8')
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, data, 0)
    os.fsync(self._fd)

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        os.utime(self.path)
      except OSError:
        pass

  @property
  def held(self) -> bool:
    """True between `acquire` and `release`."""
    return self._fd is not None

  def release(self) -> None:
    """Removes the lock file and releases the lock (no-op if not held)."""
    if self._fd is None:
      return
    self._stop.set()
    try:
      if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
        os.unlink(self.path)
    except OSError:
      pass
    os.close(self._fd)  # Releases the flock.
    self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self if self.held else self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
