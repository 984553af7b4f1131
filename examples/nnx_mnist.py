"""Trains a Flax NNX network on the embedded MNIST into a sparse ternary one with EC2T.

    python examples/nnx_mnist.py              # the numbers in docs/training.md §7
    python examples/nnx_mnist.py --smoke      # a few steps, for the tests

The whole recipe in an ordinary NNX loop: train in full precision with Adam,
then hand the same model to `nnx.Optimizer` with `ec2t_jax.ec2t(...)`, put the
initial ternary kernels into the model with one line, and keep training. The
assignment freezes for the last epoch (`freeze_assignment_at` counts the EC2T
optimizer's own updates, from its `init`).
"""

import argparse
import functools
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import ec2t_jax
from ec2t_jax.training import datasets


class MLP(nnx.Module):
  """784 → 512 → 512 → 10 with ReLU."""

  def __init__(self, rngs: nnx.Rngs, width: int = 512):
    self.fc1 = nnx.Linear(784, width, rngs=rngs)
    self.fc2 = nnx.Linear(width, width, rngs=rngs)
    self.fc3 = nnx.Linear(width, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.fc1(x.reshape((x.shape[0], -1))))
    return self.fc3(nnx.relu(self.fc2(x)))


def mnist_arrays():
  """The embedded MNIST as float32 arrays, normalized with MNIST's mean and std."""
  data = datasets.load_embedded_mnist()

  def prepare(split):
    images, labels = data[split]
    x = (images.astype(np.float32) / 255.0 - 0.1307) / 0.3081
    return x, labels.astype(np.int32)

  return prepare('train'), prepare('test')


def loss_fn(model, x, y):
  """Mean cross-entropy of `model` on one batch."""
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
  """One optimizer step; returns the loss."""
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def correct(model, x, y):
  """Number of correct predictions in one batch."""
  return jnp.sum(jnp.argmax(model(x), -1) == y)


def accuracy(model, x, y, batch=2000):
  """Test accuracy over all of `x`."""
  return sum(
    int(correct(model, x[i : i + batch], y[i : i + batch])) for i in range(0, len(x), batch)
  ) / len(x)


def run_epochs(model, optimizer, x, y, *, epochs, batch, seed, max_steps=None):
  """Shuffled minibatch training; returns the number of steps taken."""
  rng = np.random.default_rng(seed)
  steps = 0
  for _ in range(epochs):
    order = rng.permutation(len(x))
    for i in range(0, len(x) - batch + 1, batch):
      idx = order[i : i + batch]
      train_step(model, optimizer, x[idx], y[idx])
      steps += 1
      if max_steps and steps >= max_steps:
        return steps
  return steps


def main(argv=None):
  """Runs the example and prints accuracy and sparsity; returns them as a dict."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--smoke', action='store_true', help='a few steps per stage, for tests')
  parser.add_argument('--fp-epochs', type=int, default=3, help='full-precision epochs')
  parser.add_argument('--ec2t-epochs', type=int, default=4, help='EC2T epochs')
  parser.add_argument('--frozen-epochs', type=int, default=1, help='frozen-assignment epochs')
  parser.add_argument('--gamma', type=float, default=0.15, help='entropy gain γ')
  parser.add_argument('--init-scale', type=float, default=0.6, help='initial centroid scale s')
  args = parser.parse_args(argv)
  start = time.time()
  (x_train, y_train), (x_test, y_test) = mnist_arrays()
  batch, limit = 128, (5 if args.smoke else None)
  if args.smoke:
    x_test, y_test = x_test[:500], y_test[:500]

  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  run_epochs(
    model, optimizer, x_train, y_train, epochs=args.fp_epochs, batch=batch, seed=0, max_steps=limit
  )
  fp_accuracy = accuracy(model, x_test, y_test)
  print(f'full precision: test accuracy {fp_accuracy:.4f}', flush=True)

  # EC2T: fc1 and fc2 ternary, the classifier (the last layer) in full precision.
  steps_per_epoch = len(x_train) // batch
  ec2t_steps = limit or args.ec2t_epochs * steps_per_epoch
  tx = ec2t_jax.ec2t(
    functools.partial(ec2t_jax.default_ternary_mask, keep_first=False),
    gamma=args.gamma,
    init_scale=args.init_scale,
    latent_optimizer=optax.adam(3e-4),
    fp_optimizer=ec2t_jax.default_fp_optimizer(3e-4),
    freeze_assignment_at=ec2t_steps,
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  nnx.update(model, ec2t_jax.ternarize(nnx.state(model, nnx.Param), optimizer.opt_state))
  epochs = args.ec2t_epochs + args.frozen_epochs
  run_epochs(
    model,
    optimizer,
    x_train,
    y_train,
    epochs=epochs,
    batch=batch,
    seed=1,
    max_steps=limit and 2 * limit,
  )

  test_accuracy = accuracy(model, x_test, y_test)
  stats = ec2t_jax.summarize(optimizer.opt_state)
  levels = {
    name: len(np.unique(np.asarray(layer.kernel[...])))
    for name, layer in (('fc1', model.fc1), ('fc2', model.fc2))
  }
  print(
    f'ternary: test accuracy {test_accuracy:.4f}, sparsity of ternary weights '
    f'{stats["total_sparsity"]:.4f}, distinct values per kernel {levels}, '
    f'{time.time() - start:.0f} s'
  )
  return {
    'fp_accuracy': fp_accuracy,
    'accuracy': test_accuracy,
    'sparsity': stats['total_sparsity'],
    'levels': levels,
  }


if __name__ == '__main__':
  main()
