"""Trains a network into a sparse ternary one with EC2T.

    python main.py --config=configs/mnist.py --workdir=/tmp/ec2t_mnist
    python main.py --config=configs/cifar10.py:resnet20 --workdir=... --config.ec2t.gamma=0.3

Rerunning the same command with the same --workdir resumes the run.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from ec2t_jax.training import datasets, train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and summary.json.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(logging.Filter):
  """Drops INFO chatter of orbax and tfds (every checkpoint save logs a dozen lines)."""

  def filter(self, record):
    noisy = ('/orbax/', '/tensorflow_datasets/', '/grain/', 'xla_bridge.py')
    return record.levelno > logging.INFO or not any(n in record.pathname for n in noisy)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  logging.getLogger().setLevel(logging.INFO)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (
    ValueError,
    TypeError,
    OSError,
    datasets.DatasetNotPreparedError,
    train.NonFiniteError,
  ) as e:
    # One line that names the problem and the fix; no traceback for bad input.
    sys.exit('error: ' + ' '.join(str(e).split()))


def parse_flags(argv):
  """Parses flags; a bad override (`--config.ec2t.gama=0.1`) is a one-line error."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    message = ' '.join(str(e).replace('\\n', ' ').replace('\\', '').replace("'", '').split())
    sys.exit(f'error: bad flag: {message}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
