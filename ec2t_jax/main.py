"""Trains a network into a sparse ternary one with EC2T.

    ec2t-train --config=mnist --workdir=/tmp/ec2t_mnist
    python -m ec2t_jax.main --config=cifar10:resnet20 --workdir=... --config.ec2t.gamma=0.3
    python main.py --config=configs/mnist.py:smoke --workdir=...   # in a clone of the repository

`--config=FILE[:VARIANT]` takes a config file; where FILE does not exist, it names a
packaged recipe instead (`mnist`, `cifar10`, `cifar100`, `imagenet`, see
`ec2t_jax.configs`). Rerunning the same command with the same --workdir resumes the run.
Needs the training dependencies: pip install 'ec2t_jax[train]'.
"""

import logging
import os
import sys
from collections.abc import Sequence

from ec2t_jax import configs as configs_lib

TRAIN_EXTRA = "pip install 'ec2t_jax[train]'"


class _QuietLibraries(logging.Filter):
  """Drops INFO chatter of orbax and tfds (every checkpoint save logs a dozen lines)."""

  def filter(self, record):
    """Keeps warnings and errors, and INFO records of everything but the noisy libraries."""
    noisy = ('/orbax/', '/tensorflow_datasets/', '/grain/', 'xla_bridge.py')
    if '/tensorflow_datasets/' in record.pathname and record.getMessage().endswith(
      'has no dataset_info.json'
    ):
      return False  # tfds probing a dataset that is not prepared; the error says so.
    return record.levelno > logging.INFO or not any(n in record.pathname for n in noisy)


def resolve_config(value: str) -> str:
  """The `--config` value to load: `value`, or a packaged recipe's file in place of its path.

  'mnist:smoke' (also 'mnist.py:smoke' or 'configs/mnist.py:smoke') becomes
  '.../ec2t_jax/configs/mnist.py:smoke' when no file 'mnist' exists; a path that exists is
  returned as given. A path that neither exists nor names a recipe is a ValueError.
  """
  path, colon, variant = value.partition(':')
  if os.path.exists(path):
    return value
  directory, name = os.path.split(path)
  try:
    if directory not in ('', 'configs'):
      raise ValueError(f'no packaged recipe {name!r}')
    return configs_lib.recipe_path(name) + colon + variant
  except ValueError:
    raise ValueError(
      f'no config file {path!r}, and it names no packaged recipe '
      f'({", ".join(configs_lib.RECIPES)}; e.g. --config=mnist:smoke)'
    ) from None


def resolve_config_args(argv: Sequence[str]) -> list[str]:
  """`argv` with `--config=...` / `--config ...` resolved by `resolve_config` (flags unparsed)."""
  argv = list(argv)
  for i in range(1, len(argv)):
    arg = argv[i]
    if arg == '--':
      break
    for prefix in ('--config=', '-config='):
      if arg.startswith(prefix):
        argv[i] = prefix + resolve_config(arg[len(prefix) :])
    if arg in ('--config', '-config') and i + 1 < len(argv):
      argv[i + 1] = resolve_config(argv[i + 1])
  return argv


def import_program():
  """Imports the training program and defines its flags (once); a missing extra is one line."""
  try:
    from absl import flags
    from ml_collections import config_flags

    from ec2t_jax.training import train  # noqa: F401  (imported before the flags are parsed)
  except ModuleNotFoundError as e:
    if (e.name or '').startswith('ec2t_jax'):
      raise
    sys.exit(f'error: the training program needs the module {e.name!r}: {TRAIN_EXTRA}')
  if 'workdir' not in flags.FLAGS:
    flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and summary.json.')
    config_flags.DEFINE_config_file(
      'config',
      None,
      'Training configuration: FILE[:VARIANT] or RECIPE[:VARIANT].',
      lock_config=True,
    )
    flags.mark_flags_as_required(['config', 'workdir'])
  # `--help` lists the key flags of the program's file (main.py, ec2t-train, ...).
  for name in ('config', 'workdir'):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])


def run_command(argv: Sequence[str], action, *, interrupted: str) -> None:
  """Runs `action()` as a command's absl main: INFO logging, bad input as one `error:` line.

  Shared by `python -m ec2t_jax.main` and `python -m ec2t_jax.sweep`.

  Args:
    argv: what absl left of the command line (only the program name is allowed).
    action: the work, called with no arguments.
    interrupted: what to tell the user after a second Ctrl-C (exit status 130).
  """
  from absl import app

  from ec2t_jax.training import datasets, train

  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  logging.getLogger().setLevel(logging.INFO)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  try:
    action()
  except (
    ValueError,
    TypeError,
    OSError,
    datasets.DatasetNotPreparedError,
    train.NonFiniteError,
  ) as e:
    # One line that names the problem and the fix; no traceback for bad input.
    sys.exit('error: ' + ' '.join(str(e).split()))
  except ImportError as e:  # An optional extra (torch for a .pt init_from, ...) is missing.
    if (getattr(e, 'name', None) or '').startswith('ec2t_jax'):
      raise
    sys.exit('error: ' + ' '.join(str(e).split()))
  except KeyboardInterrupt:  # A second Ctrl-C: the first one's checkpoint may be incomplete.
    print(f'interrupted; {interrupted}', file=sys.stderr)
    sys.exit(130)


def main(argv: Sequence[str]) -> None:
  """Trains `--config` in `--workdir` (absl's main); bad input exits with one `error:` line."""
  from absl import flags

  from ec2t_jax.training import train

  run_command(
    argv,
    lambda: train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir),
    interrupted='rerun the same command to resume from the last checkpoint',
  )


def parse_flags(argv: Sequence[str]) -> list[str]:
  """Parses flags; a bad override (`--config.ec2t.gama=0.1`) is a one-line error."""
  from absl import flags

  try:
    argv = resolve_config_args(argv)
  except ValueError as e:
    sys.exit(f'error: {e}')
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    missing = [n for n in ('config', 'workdir') if f'Flag --{n} must have a value' in str(e)]
    if missing:
      sys.exit(
        f'error: {" and ".join("--" + n for n in missing)} must be given, e.g. '
        f'{os.path.basename(argv[0]) if argv else "main.py"} --config=mnist:smoke '
        '--workdir=/tmp/ec2t_mnist (--help lists the flags)'
      )
    message = ' '.join(str(e).replace('\\n', ' ').replace('\\', '').replace("'", '').split())
    if any(arg.startswith('--config.model_kwargs.') for arg in argv):
      message += (
        ' (config.model_kwargs holds only the fields its config sets: set new ones in a config '
        'file, e.g. config.model_kwargs.width = 512, and pass --config=that_file.py)'
      )
    elif any(arg.startswith('--config.stages.') for arg in argv):
      message += (
        ' (the command line can change the fields of stages a config defines, not add stages '
        'or fields: define them in a config file, see docs/recipes.md)'
      )
    sys.exit(f'error: bad flag: {message}')


def run(argv: Sequence[str] | None = None) -> None:
  """The command line (`ec2t-train`, `python -m ec2t_jax.main`, the repository's main.py)."""
  import_program()
  from absl import app

  main_module = sys.modules['__main__']
  if not getattr(main_module, '__doc__', None):  # The console script's wrapper has none.
    main_module.__doc__ = __doc__
  app.run(main, argv=None if argv is None else list(argv), flags_parser=parse_flags)


if __name__ == '__main__':
  run()
