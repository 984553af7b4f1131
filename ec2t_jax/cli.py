"""Helpers shared by the command-line tools (`scoring`, `export`)."""

import os

__all__ = ['output_path_error']


def output_path_error(flag: str, path: str) -> str | None:
  """Why `path`, given as `flag`, cannot receive an output file, or None if it can.

  Checked before a tool does its work, so a bad path costs no time.

  Example:
    >>> output_path_error('--out', '/')
    "error: --out '/' is a directory, not a file"
  """
  if os.path.isdir(path):
    return f'error: {flag} {path!r} is a directory, not a file'
  if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
    return f'error: {flag} {path!r}: its directory does not exist'
  return None
