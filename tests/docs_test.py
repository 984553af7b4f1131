"""The README and docs/: a short README, links that resolve, text that stands alone."""

from __future__ import annotations

import glob
import os
import re
from urllib.parse import unquote

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, 'README.md')
README_MAX_LINES = 200
# Markdown links and images: [text](target) and ![alt](target "title").
LINK = re.compile(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
ISSUE = re.compile(r'issue\s*#?\d+', re.IGNORECASE)


def _documents() -> list[str]:
  """README.md and every Markdown file directly in docs/."""
  return [README, *sorted(glob.glob(os.path.join(REPO, 'docs', '*.md')))]


def _read(path: str) -> str:
  with open(path, encoding='utf-8') as f:
    return f.read()


def _relative_targets(text: str) -> list[str]:
  """The link targets of `text` that name a file of the repository (no URL, no anchor only)."""
  targets = []
  for target in LINK.findall(text):
    if re.match(r'^[a-zA-Z][a-zA-Z0-9+.-]*:', target) or target.startswith('#'):
      continue  # http:, https:, mailto:, ... and links within the page.
    targets.append(unquote(target.split('#', 1)[0]))
  return targets


def _name(path: str) -> str:
  return os.path.relpath(path, REPO)


def test_readme_is_short():
  with open(README, encoding='utf-8') as f:
    lines = f.read().splitlines()
  assert len(lines) <= README_MAX_LINES, (
    f'README.md has {len(lines)} lines, at most {README_MAX_LINES}: move details into docs/'
  )


@pytest.mark.parametrize('path', _documents(), ids=_name)
def test_relative_links_point_to_files(path):
  text = _read(path)
  base = os.path.dirname(path)
  missing = [t for t in _relative_targets(text) if not os.path.exists(os.path.join(base, t))]
  assert not missing, f'{_name(path)} links to files that do not exist: {missing}'


@pytest.mark.parametrize('path', _documents(), ids=_name)
def test_no_issue_numbers(path):
  text = _read(path)
  found = [
    f'line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}' for m in ISSUE.finditer(text)
  ]
  assert not found, f'{_name(path)} cites issue numbers; make the text stand alone: {found}'


def test_the_link_pattern_finds_links():
  text = '[a](docs/a.md) ![b](fig.png "t") [c](https://x.org) [d](#top) [e](f.md#sec)'
  assert _relative_targets(text) == ['docs/a.md', 'fig.png', 'f.md']
  assert ISSUE.search('see Issue #12') and ISSUE.search('issue 17') and not ISSUE.search('issues')
