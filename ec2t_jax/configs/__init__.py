"""The training recipes, packaged with `ec2t_jax` so that an installed program finds them.

Each module has a `get_config(variant)` for ml_collections' `--config` flag:

    ec2t-train --config=mnist:smoke --workdir=/tmp/mnist          # a packaged recipe by name
    python main.py --config=configs/mnist.py:smoke --workdir=...  # the repository's files

The repository's `configs/*.py` re-export these. Importing this package imports
nothing beyond the standard library; the recipes need `ml_collections` (the `[train]` extra).
"""

import os

RECIPES = ('mnist', 'cifar10', 'cifar100', 'imagenet', 'default')
"""The packaged recipes, by the name that `--config=NAME[:VARIANT]` accepts."""


def recipe_path(name: str) -> str:
  """The file of the packaged recipe `name` ('mnist' or 'mnist.py'); ValueError if none is."""
  stem = name[: -len('.py')] if name.endswith('.py') else name
  if stem not in RECIPES:
    raise ValueError(
      f'no packaged recipe {name!r}; packaged: {", ".join(RECIPES)} (or give a config file path)'
    )
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), stem + '.py')
