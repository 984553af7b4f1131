"""Replacing a file whole: written to a temporary file beside it, then renamed into place.

Every file the project replaces (`summary.json`, `config.json`, `.ec2t`, `.onnx`,
`report.md` and its figures, `sweep.json`, `sweep.md`, the scoring JSON) goes through
`replace_file`, so a failed write (a full disk, a file-size limit, a signal) leaves the
old file as it was and never a cut one, and a symlink planted at the path is replaced
itself, never written through.

Example:
  >>> replace_file('/tmp/example.json', b'{}')
  >>> with replacing('/tmp/example.txt', 'w') as f:
  ...   f.write('hello')
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO

__all__ = ['replace_file', 'replacing']


@contextlib.contextmanager
def replacing(path: str | os.PathLike, mode: str = 'wb') -> Iterator[IO]:
  """A file object whose content replaces `path` when the block ends without an error.

  The data goes to a new temporary file in the same directory (created with
  `O_EXCL`, so nothing planted there is followed), is flushed to disk, and is
  renamed over `path` in one step (`os.replace`). If the block raises, the
  temporary file is removed and `path` is untouched.

  Args:
    path: the file to replace (or create).
    mode: `'wb'` or `'w'` (text, UTF-8).

  Raises:
    ValueError: for another mode.
    OSError: when the directory cannot take the file; `path` is unchanged.
  """
  if mode not in ('wb', 'w'):
    raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=directory)
  try:
    with os.fdopen(fd, mode, **({'encoding': 'utf-8'} if mode == 'w' else {})) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())  # On disk before the rename: a power cut leaves old or new.
    os.chmod(tmp, 0o644 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def replace_file(path: str | os.PathLike, data: bytes | str) -> None:
  """Replaces `path` with `data` (bytes, or text written as UTF-8) whole (`replacing`)."""
  with replacing(path, 'w' if isinstance(data, str) else 'wb') as f:
    f.write(data)


def _umask() -> int:
  """The process's umask (read without changing it for longer than one call)."""
  mask = os.umask(0)
  os.umask(mask)
  return mask
