"""``python -m ec2t_jax.report``: see `ec2t_jax.report.cli`."""

import sys

from ec2t_jax.report.cli import main

if __name__ == '__main__':
  sys.exit(main())
