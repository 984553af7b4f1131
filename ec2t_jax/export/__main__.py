"""``python -m ec2t_jax.export``: runs `ec2t_jax.export.command.main`."""

import sys

from ec2t_jax.export.command import main

if __name__ == '__main__':
  sys.exit(main())
