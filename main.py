"""Trains a network into a sparse ternary one with EC2T.

    python main.py --config=configs/mnist.py --workdir=/tmp/ec2t_mnist
    python main.py --config=configs/cifar10.py:resnet20 --workdir=... --config.ec2t.gamma=0.3

Rerunning the same command with the same --workdir resumes the run. The program lives in
`ec2t_jax/main.py`; installed, it is also `ec2t-train` and `python -m ec2t_jax.main`.
"""

from ec2t_jax.main import run

if __name__ == '__main__':
  run()
