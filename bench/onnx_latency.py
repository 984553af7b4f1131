"""ONNX export: file sizes, and onnxruntime's CPU latency against JAX (docs/onnx.md).

    python bench/onnx_latency.py --models lenet5,resnet20 --json onnx.json
    python bench/onnx_latency.py --workdir /tmp/wd_mnist --json onnx.json
    python bench/onnx_latency.py --models lenet5 --smoke

For every network: the ONNX file (`ec2t_jax.onnx_export`, ternary kernels as
int8) against the float32 parameters and the entropy-coded `.ec2t` file
(`ec2t_jax.export.dumps`), and the median latency of one forward pass at batch
1 and 128 in onnxruntime (CPU, one intra-op thread) and in JAX (the jitted
``model.apply``, XLA:CPU single-threaded), both on the same inputs, whose
logits are compared too. A `--models` name gets freshly initialized variables
with the EC2T reference selection ternarized by the optimizer's own init
(`ec2t_jax.ec2t`, `ec2t_jax.ternarize`); a `--workdir` is read as by
`python -m ec2t_jax.export`. Run it on one core: ``taskset -c 0``.
"""

from __future__ import annotations

import os

# One XLA:CPU thread, as onnxruntime gets one intra-op thread (before jax is imported).
os.environ.setdefault(
  'XLA_FLAGS', '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'
)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ec2t_jax  # noqa: E402
from ec2t_jax import export, masks, models, onnx_export, tree_util  # noqa: E402

# One image of each zoo model the benchmark knows by name.
INPUT_SHAPES = {
  'lenet5': (28, 28, 1),
  'resnet20': (32, 32, 3),
  'vit_tiny': (28, 28, 1),
  'micronet_c100': (32, 32, 3),
}


def named_network(name: str, seed: int = 0) -> dict[str, Any]:
  """A zoo model with the reference selection ternarized by EC2T's own initialization."""
  if name not in INPUT_SHAPES:
    raise ValueError(f'unknown model {name!r}; valid: {sorted(INPUT_SHAPES)}')
  shape = INPUT_SHAPES[name]
  model = models.create(name, num_classes=10)
  x = jnp.zeros((1, *shape))
  variables = jax.device_get(jax.jit(model.init)(jax.random.key(seed), x))
  mask = masks.default_ternary_mask(variables['params'], order=masks.call_order(model, x))
  tx = ec2t_jax.ec2t(mask)
  opt_state = tx.init(variables['params'])
  variables = {**variables, 'params': ec2t_jax.ternarize(variables['params'], opt_state)}
  return dict(
    name=name, model=model, variables=variables, opt_state=opt_state, shape=shape, norm=None
  )


def workdir_network(path: str) -> dict[str, Any]:
  """The network of a workdir's newest checkpoint, as `python -m ec2t_jax.export` reads it."""
  from ec2t_jax.training import workdir as workdir_lib

  run = workdir_lib.load_workdir(path)
  return dict(
    name=f'{run.config.model} ({path})',
    model=run.model,
    variables=run.variables,
    opt_state=run.opt_state,
    shape=tuple(run.image_shape),
    norm=run.normalization,
  )


def _median_ms(fn, repeats: int) -> float:
  fn()  # Warm-up (compilation, allocation).
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def measure(net: dict[str, Any], batches: list[int], repeats: int) -> dict[str, Any]:
  """Sizes and latencies of one network (see the module docstring)."""
  import onnxruntime as ort

  model, variables, shape = net['model'], net['variables'], net['shape']
  tern = export.ternary_leaves(variables, net['opt_state'])
  start = time.perf_counter()
  proto = onnx_export.to_onnx(
    model, variables, shape, ternary_leaves=tern, normalization=net['norm']
  )
  export_s = time.perf_counter() - start
  onnx_bytes = len(proto.SerializeToString())
  float32_bytes = sum(np.asarray(v).size * 4 for _, v in tree_util.named_leaves(variables))
  try:
    ec2t_bytes = len(export.dumps(variables, net['opt_state'], entropy_coding=True)[0])
  except ImportError:  # constriction (the [export] extra) missing.
    ec2t_bytes = None
  options = ort.SessionOptions()
  options.intra_op_num_threads = 1
  options.inter_op_num_threads = 1
  session = ort.InferenceSession(
    proto.SerializeToString(), options, providers=['CPUExecutionProvider']
  )
  mean, std = (np.float32(0.0), np.float32(1.0)) if net['norm'] is None else net['norm']
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  apply = jax.jit(lambda v, x: model.apply(v, (x - mean) / std, train=False))
  rows = []
  for batch in batches:
    x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
    got = session.run(None, {onnx_export.INPUT_NAME: x})[0]
    ref = np.asarray(apply(variables, x))
    err = float(np.max(np.abs(got - ref)) / (np.max(np.abs(ref)) + 1e-30))
    ort_ms = _median_ms(lambda x=x: session.run(None, {onnx_export.INPUT_NAME: x}), repeats)
    jax_ms = _median_ms(lambda x=x: apply(variables, x).block_until_ready(), repeats)
    rows.append(
      dict(
        batch=batch,
        onnxruntime_ms=ort_ms,
        jax_ms=jax_ms,
        max_rel_logit_error=err,
        same_argmax=bool(np.array_equal(got.argmax(-1), ref.argmax(-1))),
      )
    )
  return dict(
    model=net['name'],
    ternary_kernels=len(onnx_export.ternary_initializers(proto)),
    folded_batch_norms=len(onnx_export.folded_batch_norms(model, variables, shape)),
    onnx_bytes=onnx_bytes,
    float32_bytes=float32_bytes,
    ec2t_entropy_coded_bytes=ec2t_bytes,
    export_seconds=export_s,
    latency=rows,
  )


def _table(results: list[dict[str, Any]]) -> str:
  head = ('model', 'ONNX KiB', 'float32 KiB', '.ec2t KiB', 'batch', 'onnxruntime ms', 'JAX ms')
  lines = ['| ' + ' | '.join(head) + ' | max rel err |', '|---|' + '---:|' * len(head)]
  for r in results:
    ec2t = (
      '-'
      if r['ec2t_entropy_coded_bytes'] is None
      else f'{r["ec2t_entropy_coded_bytes"] / 1024:.1f}'
    )
    for row in r['latency']:
      lines.append(
        f'| {r["model"]} | {r["onnx_bytes"] / 1024:.1f} | {r["float32_bytes"] / 1024:.1f} | '
        f'{ec2t} | {row["batch"]} | {row["onnxruntime_ms"]:.3f} | {row["jax_ms"]:.3f} | '
        f'{row["max_rel_logit_error"]:.1e} |'
      )
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  """Measures every network asked for, prints a markdown table, writes `--json`."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--models', default='lenet5,resnet20', help='comma-separated zoo names')
  parser.add_argument('--workdir', default=None, help='measure a trained workdir instead')
  parser.add_argument('--batches', default='1,128', help='comma-separated batch sizes')
  parser.add_argument('--repeats', type=int, default=20, help='timed runs (the median counts)')
  parser.add_argument('--smoke', action='store_true', help='batches 1,4 and 2 repeats (a test)')
  parser.add_argument('--json', default=None, help='write the numbers to this file')
  args = parser.parse_args(argv)
  batches = [int(b) for b in args.batches.split(',')]
  repeats = args.repeats
  if args.smoke:
    batches, repeats = [1, 4], 2
  if repeats < 1:
    parser.error(f'--repeats must be >= 1, got {repeats}')
  if args.workdir:
    nets = [workdir_network(args.workdir)]
  else:
    nets = [named_network(name) for name in args.models.split(',')]
  results = [measure(net, batches, repeats) for net in nets]
  print(_table(results))
  if args.json:
    import onnxruntime

    with open(args.json, 'w') as f:
      json.dump(
        dict(
          results=results,
          versions=dict(
            jax=jax.__version__,
            onnxruntime=onnxruntime.__version__,
            onnx=onnx_export.onnx.__version__,
          ),
          machine=platform.processor() or platform.machine(),
          repeats=repeats,
        ),
        f,
        indent=2,
      )
  return 0


if __name__ == '__main__':
  sys.exit(main())
