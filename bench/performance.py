"""The performance benchmarks, one subcommand each.

    python bench/performance.py step     [--models lenet5,resnet20,micronet_c100] [--dtypes ...]
    python bench/performance.py update   [--models resnet20,micronet_c100,resnet50]
    python bench/performance.py compile  [--models resnet20,micronet_c100,efficientnet_b1]
    python bench/performance.py memory   [--model micronet_c100]
    python bench/performance.py pipeline [--dataset cifar10]
    python bench/performance.py eval     [--models lenet5,resnet20]
    python bench/performance.py torch    (PyTorch's CPU ResNet-20 Adam and EC2T steps against ours)
    python bench/performance.py profile  [--model resnet20] (where a step's time goes, per op kind)

Every subcommand measures both sides of its comparison in this one process
(EC2T against Adam, pipeline against train step, ...), prints a markdown table
and, with `--json FILE`, writes the raw numbers. `docs/benchmarks.md` holds the
results and the exact commands.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ec2t_jax  # noqa: E402
from ec2t_jax import models, transforms  # noqa: E402


def make_step(model, tx):
  """A jitted train step (forward, backward, optimizer update) for `tx`, state donated."""

  def step(params, batch_stats, opt_state, images, labels):
    def loss_fn(p):
      logits, updates = model.apply(
        {'params': p, 'batch_stats': batch_stats},
        images,
        train=True,
        mutable=['batch_stats'],
        rngs={'dropout': jax.random.key(1)},
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates['batch_stats']

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1, 2))


def _num_classes(name: str) -> int:
  if name.startswith('efficientnet') or name in ('resnet18', 'resnet34', 'resnet50'):
    return 1000
  return 100 if name.endswith('c100') else 10


def _setup(name: str, batch: int, dtype=jnp.float32):
  """Model, a synthetic batch, float32 variables and the default ternary mask."""
  model = models.create(name, num_classes=_num_classes(name), dtype=dtype)
  shape = models.input_shape(name)
  key = jax.random.key(0)
  images = jax.random.normal(key, (batch, *shape))
  labels = jax.random.randint(key, (batch,), 0, _num_classes(name))
  variables = jax.jit(lambda k: model.init(k, images[:1], train=False))(key)
  order = ec2t_jax.masks.call_order(model, images[:1], train=False)
  mask = ec2t_jax.default_ternary_mask(variables['params'], order=order)
  return model, images, labels, variables, mask


def _optimizers(mask) -> tuple[tuple[str, optax.GradientTransformation], ...]:
  """The two sides of every comparison: plain Adam and the default EC2T optimizer."""
  return (('adam', optax.adam(1e-4)), ('ec2t', ec2t_jax.ec2t(mask)))


def _median_time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _machine() -> dict[str, Any]:
  return {
    'device': str(jax.devices()[0].device_kind),
    'platform': jax.default_backend(),
    'machine': platform.machine(),
    'cpu_count': os.cpu_count(),
    'jax': jax.__version__,
  }


def _table(header: list[str], rows: list[list[Any]]) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f'{v:,.3g}' if abs(v) < 100 else f'{v:,.0f}'
    if isinstance(v, int):
      return f'{v:,}'
    return str(v)

  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(fmt(v) for v in row) + ' |' for row in rows]
  return '\n'.join(lines)


# Instructions of a compiled module's ENTRY computation that are not work: its inputs, the
# tuples that bundle its outputs, constants and layout-only bitcasts.
_NOT_WORK = ('parameter', 'tuple', 'get-tuple-element', 'constant', 'bitcast')


def _computations(hlo_text: str) -> dict[str, list[str]]:
  """`{name: instruction lines}` of every computation in an HLO module's text ('ENTRY' too)."""
  out: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    header = re.match(r'(ENTRY )?%?([\w.-]+) .*\{$', line)
    if header and not line.startswith(' '):
      current = 'ENTRY' if header.group(1) else header.group(2)
      out[current] = []
    elif line.startswith('}'):
      current = None
    elif current is not None and ' = ' in line:
      out[current].append(line)
  return out


def _work(lines: list[str]) -> list[str]:
  """The lines of `lines` that are work: instructions whose opcode is not in `_NOT_WORK`."""
  work = []
  for line in lines:
    match = re.match(r'\s*(?:ROOT )?%?[\w.-]+ = .*? ([\w-]+)\(', line)
    if match and match.group(1) not in _NOT_WORK:
      work.append(line)
  return work


def entry_ops(hlo_text: str) -> int:
  """Number of instructions in the ENTRY computation of `compiled.as_text()`, less `_NOT_WORK`.

  Each one is a kernel (a fusion, a copy, a convolution, ...) the executable runs per
  call, and roughly what XLA compiles: the count grows with the layers an optimizer
  handles one by one.
  """
  return len(_work(_computations(hlo_text)['ENTRY']))


def kernel_ops(hlo_text: str) -> int:
  """`entry_ops`, plus the instructions of the computations ENTRY runs through control flow.

  `ec2t(skip_nonfinite=True)` runs its whole update inside a `lax.cond`, whose branches
  are computations of their own: ENTRY then shows one `conditional`. This count
  follows `conditional` branches, `while` bodies and conditions and `call`s
  (recursively), not fusions' insides nor reducers.
  """
  computations = _computations(hlo_text)
  called = (
    r'(?:branch_computations=\{|true_computation=|false_computation=|body=|condition=|to_apply=)'
  )
  pending, seen, count = ['ENTRY'], set(), 0
  while pending:
    name = pending.pop()
    if name in seen or name not in computations:
      continue
    seen.add(name)
    for line in _work(computations[name]):
      count += 1
      if re.search(r' (conditional|while|call)\(', line):
        for names in re.findall(called + r'([^},]*(?:, *%[^},]*)*)', line):
          pending += [n.strip().lstrip('%') for n in names.split(',')]
  return count


def _compile(fn, *args) -> tuple[Any, float, int]:
  """`jax.jit(fn)` lowered and compiled for `args`: (executable, seconds, entry ops)."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - t0, entry_ops(compiled.as_text())


def _update_fn(tx):
  """`(params, state, grads) -> (new params, new state)`: `tx.update` and `apply_updates`."""

  def update(p, state, g):
    u, state = tx.update(g, state, p)
    return optax.apply_updates(p, u), state

  return update


def _ternary_part(params, mask) -> dict[str, Any]:
  """`ternary_training` alone over the ternary leaves: its update's compile time and entry ops.

  The leaves are passed as a flat `{path: leaf}` dict, as `optax.partition` would hand
  them to the transformation, and `apply_updates` writes them back.
  """
  leaves = {
    name: leaf
    for (name, leaf), m in zip(
      ec2t_jax.tree_util.named_leaves(params), jax.tree.leaves(mask), strict=True
    )
    if m
  }
  tx = ec2t_jax.ternary_training()
  state = jax.eval_shape(tx.init, leaves)
  _, seconds, ops = _compile(_update_fn(tx), leaves, state, leaves)
  return {'ternary_part_compile_s': seconds, 'ternary_part_entry_ops': ops}


def _ternary_leaves(params, mask) -> list[Any]:
  return [x for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True) if m]


def _ternary_count(params, mask) -> tuple[int, int]:
  sizes = [x.size for x in _ternary_leaves(params, mask)]
  return len(sizes), int(sum(sizes))


# --- 1. train-step throughput --------------------------------------------------------------


def bench_step(args) -> list[dict[str, Any]]:
  """Images/s of a jitted Adam step and an EC2T step, interleaved, per model and dtype."""
  results = []
  for name in args.models.split(','):
    for dtype_name in args.dtypes.split(','):
      dtype = jnp.bfloat16 if dtype_name == 'bfloat16' else jnp.float32
      model, images, labels, variables, mask = _setup(name, args.batch, dtype)
      params, stats = variables['params'], variables.get('batch_stats', {})
      runs = {}
      for opt_name, tx in _optimizers(mask):
        opt_state = tx.init(params)
        p = ec2t_jax.ternarize(params, opt_state) if opt_name == 'ec2t' else params
        step = make_step(model, tx)
        carry = jax.tree.map(jnp.copy, (p, stats, opt_state))
        t0 = time.perf_counter()
        *carry, loss = step(*carry, images, labels)
        loss.block_until_ready()
        runs[opt_name] = {'step': step, 'carry': carry, 'first_s': time.perf_counter() - t0}
        runs[opt_name]['times'] = []
      for _ in range(args.steps):
        for run in runs.values():
          t0 = time.perf_counter()
          *carry, loss = run['step'](*run['carry'], images, labels)
          loss.block_until_ready()
          run['times'].append(time.perf_counter() - t0)
          run['carry'] = carry
      adam = statistics.median(runs['adam']['times'])
      ec2t = statistics.median(runs['ec2t']['times'])
      results.append(
        {
          'model': name,
          'dtype': dtype_name,
          'batch': args.batch,
          'steps': args.steps,
          'adam_ms': adam * 1e3,
          'ec2t_ms': ec2t * 1e3,
          'adam_images_per_s': args.batch / adam,
          'ec2t_images_per_s': args.batch / ec2t,
          'ratio': ec2t / adam,
          'fence_updates': transforms._FENCE_UPDATES,
          'first_step_s': {k: r['first_s'] for k, r in runs.items()},
        }
      )
      print(json.dumps(results[-1]), flush=True)
  print(
    _table(
      ['model', 'dtype', 'Adam img/s', 'EC2T img/s', 'EC2T/Adam'],
      [
        [r['model'], r['dtype'], r['adam_images_per_s'], r['ec2t_images_per_s'], r['ratio']]
        for r in results
      ],
    )
  )
  return results


# --- 2. cost of the EC2T update alone --------------------------------------------------------


def bench_update(args) -> list[dict[str, Any]]:
  """Time of `tx.update` + `apply_updates` alone, EC2T against Adam, on random gradients."""
  results = []
  for name in args.models.split(','):
    _, _, _, variables, mask = _setup(name, 1)
    params = variables['params']
    grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
    layers, ternary = _ternary_count(params, mask)
    row = {'model': name, 'params': int(sum(x.size for x in jax.tree.leaves(params)))}
    row.update({'ternary_layers': layers, 'ternary_params': ternary})
    for opt_name, tx in _optimizers(mask):
      state = tx.init(params)
      p = ec2t_jax.ternarize(params, state) if opt_name == 'ec2t' else params
      update, seconds, ops = _compile(_update_fn(tx), p, state, grads)
      row[f'{opt_name}_compile_s'] = seconds
      row[f'{opt_name}_entry_ops'] = ops
      row[f'{opt_name}_kernel_ops'] = kernel_ops(update.as_text())
      row[f'{opt_name}_ms'] = 1e3 * _median_time(update, p, state, grads, repeats=args.repeats)
    row['ec2t_ms_per_million_ternary'] = row['ec2t_ms'] / (ternary / 1e6)
    row.update(_ternary_part(params, mask))
    results.append(row)
    print(json.dumps(row), flush=True)
  print(
    _table(
      [
        'model',
        'ternary params',
        'layers',
        'Adam update ms',
        'EC2T update ms',
        'EC2T ms / M',
        'Adam entry ops',
        'EC2T entry ops',
        'EC2T kernel ops',
        'ternary part entry ops',
      ],
      [
        [
          r['model'],
          r['ternary_params'],
          r['ternary_layers'],
          r['adam_ms'],
          r['ec2t_ms'],
          r['ec2t_ms_per_million_ternary'],
          r['adam_entry_ops'],
          r['ec2t_entry_ops'],
          r['ec2t_kernel_ops'],
          r['ternary_part_entry_ops'],
        ]
        for r in results
      ],
    )
  )
  return results


# --- 3. compile time -----------------------------------------------------------------------


def bench_compile(args) -> list[dict[str, Any]]:
  """Seconds to lower and compile the train step (or, `--part update`, the update alone).

  Each optimizer is compiled `--repeats` times (caches cleared in between) and
  `<optimizer>_s` is the median; `<optimizer>_entry_ops` counts the compiled module's
  ENTRY instructions (`entry_ops`). With `--cache_dir`, JAX's persistent compilation
  cache is turned on there and every step is compiled once more: `*_cached_s` is what
  a restarted run pays.
  """
  if args.cache_dir:
    jax.config.update('jax_compilation_cache_dir', args.cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  results = []
  for name in args.models.split(','):
    model, images, labels, variables, mask = _setup(name, args.batch)
    params, stats = variables['params'], variables.get('batch_stats', {})
    layers, _ = _ternary_count(params, mask)
    shapes = len({x.shape for x in _ternary_leaves(params, mask)})
    row = {'model': name, 'part': args.part, 'ternary_layers': layers, 'distinct_shapes': shapes}
    row['repeats'] = args.repeats
    optimizers = {
      'adam': optax.adam(1e-4),
      # Adam with optax's own skip of non-finite updates: the like-for-like baseline of
      # the default `ec2t`, which skips them too (`skip_nonfinite=True`).
      'adam_if_finite': optax.apply_if_finite(optax.adam(1e-4), max_consecutive_errors=2**30),
      'ec2t_grouped': ec2t_jax.ec2t(mask, group_layers=True),
      'ec2t_per_layer': ec2t_jax.ec2t(mask, group_layers=False),
      # As the trainer builds it: no NaN guard (the trainer stops or skips such steps)
      # and no check that the params are the last kernels (it applies updates unchanged).
      'ec2t_trainer': ec2t_jax.ec2t(
        mask, skip_nonfinite=False, guard_nonfinite=False, warn_if_moved=False
      ),
    }
    chosen = {k: tx for k, tx in optimizers.items() if k in args.optimizers.split(',')}
    states = {k: jax.eval_shape(tx.init, params) for k, tx in chosen.items()}

    def compile_once(tx, opt_state):
      jax.clear_caches()
      t0 = time.perf_counter()
      if args.part == 'update':  # The optimizer update alone, on gradients shaped like params.
        compiled = jax.jit(_update_fn(tx)).lower(params, opt_state, params).compile()
      else:
        compiled = make_step(model, tx).lower(params, stats, opt_state, images, labels).compile()
      return time.perf_counter() - t0, compiled

    # Repeats interleave the optimizers, so that a shared machine's load drifts into all alike.
    times: dict[str, list[float]] = {k: [] for k in chosen}
    for _ in range(args.repeats):
      for opt_name, tx in chosen.items():
        seconds, compiled = compile_once(tx, states[opt_name])
        times[opt_name].append(seconds)
        row[f'{opt_name}_entry_ops'] = entry_ops(compiled.as_text())
        row[f'{opt_name}_kernel_ops'] = kernel_ops(compiled.as_text())
    for opt_name, tx in chosen.items():
      row[f'{opt_name}_s'] = statistics.median(times[opt_name])
      row[f'{opt_name}_all_s'] = times[opt_name]
      if args.cache_dir:
        row[f'{opt_name}_cached_s'] = compile_once(tx, states[opt_name])[0]
    for opt_name in ('ec2t_grouped', 'ec2t_per_layer', 'ec2t_trainer'):
      for base in ('adam', 'adam_if_finite'):
        if base in chosen and opt_name in chosen:
          row[f'{opt_name}_over_{base}'] = row[f'{opt_name}_s'] / row[f'{base}_s']
    results.append(row)
    print(json.dumps(row), flush=True)
  keys = list(chosen)  # The same optimizers, in the same order, for every model.
  columns = [f'{k}{suffix}' for k in keys for suffix in ('_s', '_entry_ops', '_kernel_ops')]
  if args.cache_dir:
    columns += [f'{k}_cached_s' for k in keys]
  print(
    _table(
      ['model', 'part', 'ternary layers', 'shapes', *columns],
      [
        [r['model'], r['part'], r['ternary_layers'], r['distinct_shapes'], *[r[c] for c in columns]]
        for r in results
      ],
    )
  )
  return results


# --- 4. memory -----------------------------------------------------------------------------


def _nbytes(tree) -> int:
  return int(sum(np.dtype(x.dtype).itemsize * x.size for x in jax.tree.leaves(tree)))


def bench_memory(args) -> dict[str, Any]:
  """Optimizer-state bytes per parameter, and the peak host memory of one train step."""
  if args.child:
    model, images, labels, variables, mask = _setup(args.model, args.batch)
    params, stats = variables['params'], variables.get('batch_stats', {})
    tx = ec2t_jax.ec2t(mask) if args.child == 'ec2t' else optax.adam(1e-4)
    opt_state = tx.init(params)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step = make_step(model, tx)
    out = step(params, stats, opt_state, images, labels)
    jax.block_until_ready(out)
    out = step(*out[:3], images, labels)
    jax.block_until_ready(out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({'before_step_mib': before / 1024, 'peak_mib': peak / 1024}))
    return {}
  _, _, _, variables, mask = _setup(args.model, 1)
  params = variables['params']
  _, ternary = _ternary_count(params, mask)
  total = int(sum(x.size for x in jax.tree.leaves(params)))
  result: dict[str, Any] = {'model': args.model, 'params': total, 'ternary_params': ternary}
  states = {name: jax.eval_shape(tx.init, params) for name, tx in _optimizers(mask)}
  for opt_name, state in states.items():
    result[f'{opt_name}_state_bytes_per_param'] = _nbytes(state) / total
  assignment = [
    x for s in ec2t_jax.compression_states(states['ec2t']) for x in jax.tree.leaves(s.assignment)
  ]
  result['assignment_dtypes'] = sorted({str(x.dtype) for x in assignment})
  for opt_name in ('adam', 'ec2t'):
    cmd = [sys.executable, __file__, 'memory', f'--model={args.model}', f'--batch={args.batch}']
    out = subprocess.run([*cmd, f'--child={opt_name}'], capture_output=True, text=True, check=True)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    result[f'{opt_name}_peak_host_mib'] = child['peak_mib']
  print(json.dumps(result), flush=True)
  print(
    _table(
      [
        'model',
        'batch',
        'state B/param Adam',
        'state B/param EC2T',
        'peak MiB Adam',
        'peak MiB EC2T',
      ],
      [
        [
          args.model,
          args.batch,
          result['adam_state_bytes_per_param'],
          result['ec2t_state_bytes_per_param'],
          result['adam_peak_host_mib'],
          result['ec2t_peak_host_mib'],
        ]
      ],
    )
  )
  return result


# --- 5. input pipeline against the train step -----------------------------------------------


class JpegSource:
  """Random-access records holding real JPEG bytes, decoded with PIL when read.

  Stands in for ImageNet's array_record files, whose records tfds decodes to
  uint8 arrays as they are read: the pipeline then pays the JPEG decode, as
  it does on ImageNet. Images have ImageNet-like sizes (sides 300–500 pixels,
  JPEG quality 90; the result reports their mean size) and smooth content with
  noise, so they compress like photographs rather than like noise.
  """

  def __init__(self, n: int, seed: int = 0):
    import io

    import PIL.Image

    rng = np.random.default_rng(seed)
    self._records = []
    for _ in range(n):
      h, w = (int(v) for v in rng.integers(300, 501, 2))
      yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
      base = np.stack(
        [np.sin(xx / rng.uniform(8, 60) + c) * np.cos(yy / rng.uniform(8, 60)) for c in range(3)],
        -1,
      )
      image = (127 + 100 * base + rng.normal(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)
      buffer = io.BytesIO()
      PIL.Image.fromarray(image).save(buffer, format='JPEG', quality=90)
      self._records.append((buffer.getvalue(), int(rng.integers(0, 1000))))

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> dict[str, Any]:
    import io

    import PIL.Image

    data, label = self._records[i]
    with PIL.Image.open(io.BytesIO(data)) as image:
      return {'image': np.asarray(image.convert('RGB')), 'label': label}

  def __repr__(self) -> str:
    return f'JpegSource(n={len(self._records)})'

  @property
  def mean_bytes(self) -> float:
    """The mean size of a record's JPEG bytes."""
    return float(np.mean([len(d) for d, _ in self._records]))


def _pipeline_source(args):
  """The benchmark's records: JPEG bytes for ImageNet, in-memory arrays otherwise."""
  from ec2t_jax.training import datasets

  spec = datasets.get_spec(args.dataset)
  if spec.recipe == 'imagenet':
    return JpegSource(args.examples)
  shape = (32, 32, 3) if spec.name.startswith('cifar') else (28, 28, 1)
  rng = np.random.default_rng(0)
  n = args.examples
  return datasets.InMemorySource(
    rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)
  )


def bench_pipeline(args) -> dict[str, Any]:
  """Images/s of the recipe's training pipeline (with augmentation) and of the train step.

  For ImageNet (`--dataset imagenet2012`) the records are real JPEG bytes, so
  the pipeline pays decode + random-resized crop + flip per image; the result
  gives images/s per worker process and the worker processes needed to feed
  `--target` images/s (e.g. a GPU step's rate). `--steps 0` skips the step.
  """
  from absl import flags as absl_flags

  from ec2t_jax.training import input_pipeline  # tfds and grain: only this benchmark.

  if not absl_flags.FLAGS.is_parsed():  # grain's worker processes read absl flags.
    absl_flags.FLAGS.mark_as_parsed()

  source = _pipeline_source(args)
  result: dict[str, Any] = {'dataset': args.dataset, 'batch': args.batch, 'model': args.model}
  if isinstance(source, JpegSource):
    result['mean_jpeg_bytes'] = source.mean_bytes
  for workers in [int(w) for w in args.workers.split(',')]:
    it = input_pipeline.create_split(
      source,
      batch_size=args.batch,
      train=True,
      seed=0,
      dataset=args.dataset,
      worker_count=workers,
    )
    next(it)  # Start-up (worker processes) is not throughput.
    t0 = time.perf_counter()
    for _ in range(args.batches):
      next(it)
    rate = args.batches * args.batch / (time.perf_counter() - t0)
    result[f'pipeline_images_per_s_workers{workers}'] = rate
    result[f'pipeline_images_per_s_per_worker{workers}'] = rate / max(workers, 1)
    del it
  per_worker = max(v for k, v in result.items() if k.startswith('pipeline_images_per_s_per'))
  if args.target:
    result['target_images_per_s'] = args.target
    result['workers_to_feed_target'] = math.ceil(args.target / per_worker)
  if args.steps:
    model, images, labels, variables, mask = _setup(args.model, args.batch)
    tx = ec2t_jax.ec2t(mask)
    opt_state = tx.init(variables['params'])
    params = ec2t_jax.ternarize(variables['params'], opt_state)
    step = make_step(model, tx)
    carry = (params, variables.get('batch_stats', {}), opt_state)
    carry = step(*carry, images, labels)[:3]
    jax.block_until_ready(carry)
    t0 = time.perf_counter()
    for _ in range(args.steps):
      carry = step(*carry, images, labels)[:3]
    jax.block_until_ready(carry)
    result['step_images_per_s'] = args.steps * args.batch / (time.perf_counter() - t0)
    best = max(v for k, v in result.items() if k.startswith('pipeline_images_per_s_workers'))
    result['pipeline_over_step'] = best / result['step_images_per_s']
  print(json.dumps(result), flush=True)
  return result


# --- 6. evaluation throughput ----------------------------------------------------------------


def bench_eval(args) -> list[dict[str, Any]]:
  """Images/s of the jitted evaluation forward pass of a ternarized model."""
  results = []
  for name in args.models.split(','):
    model, images, _, variables, mask = _setup(name, args.batch)
    tx = ec2t_jax.ec2t(mask)
    params = ec2t_jax.ternarize(variables['params'], tx.init(variables['params']))
    ternary_vars = {**variables, 'params': params}
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    seconds = _median_time(forward, ternary_vars, images, repeats=args.repeats)
    row = {'model': name, 'batch': args.batch, 'images_per_s': args.batch / seconds}
    results.append(row)
    print(json.dumps(row), flush=True)
  print(
    _table(
      ['model', 'batch', 'eval img/s'],
      [[r['model'], r['batch'], r['images_per_s']] for r in results],
    )
  )
  return results


# --- PyTorch reference step ------------------------------------------------------------------


class TorchEC2T:
  """A PyTorch EC2T step with the original implementation's structure (docs/algorithm.md §2–4).

  The stand-in for the original code (issue #16 item 1), written from our own
  docs/algorithm.md: the network's ternary conv weights hold `q`; the latent
  weights `W` and each layer's centroids `[w_p, w_n]` live beside it; one step
  is forward, backward, the gradient mapping of §3.3 per layer, three Adams
  (latent 1e-4, centroids 1e-5, everything else 1e-4 with coupled L2 5e-6),
  the centroid floor, and the entropy-constrained argmin assignment of §4, in a
  Python loop over the layers as the original runs it.
  """

  def __init__(self, torch, net, ternary_names, *, gamma=0.15, init_scale=0.3):
    self.torch = torch
    self.net = net
    self.gamma = gamma
    named = dict(net.named_parameters())
    self.layers = [named[n] for n in ternary_names]
    ternary_ids = {id(p) for p in self.layers}
    self.latent = [p.detach().clone().requires_grad_(True) for p in self.layers]
    self.centroids = [
      (init_scale * torch.stack([w.max().abs(), w.min().abs()])).detach().requires_grad_(True)
      for w in self.latent
    ]
    fp = [p for p in net.parameters() if id(p) not in ternary_ids]
    self.optimizers = [
      torch.optim.Adam(self.latent, lr=1e-4),
      torch.optim.Adam(self.centroids, lr=1e-5),
      torch.optim.Adam(fp, lr=1e-4, weight_decay=5e-6),
    ]
    n_max = max(w.numel() for w in self.latent)
    self.delta = [(w.numel() / n_max + 0.05) / 1.05 for w in self.latent]
    self.assignment = [
      self._argmin(self._distances(w, c)) for w, c in zip(self.latent, self.centroids, strict=True)
    ]
    self._write_kernels()

  def _distances(self, w, c):
    w = w.detach()
    return self.torch.stack([(w + c[1].detach()) ** 2, w**2, (w - c[0].detach()) ** 2])

  def _argmin(self, costs):
    return costs.argmin(0)  # Ties to the lowest index: -w_n, then 0, then +w_p.

  def _write_kernels(self):
    with self.torch.no_grad():
      for p, a, c in zip(self.layers, self.assignment, self.centroids, strict=True):
        p.copy_((a == 2) * c[0] - (a == 0) * c[1])

  def _assign(self, w, c, delta):
    torch = self.torch
    d = self._distances(w, c)
    pre = self._argmin(d)
    n = float(w.numel())
    cnt = torch.stack([(pre == k).sum() for k in range(3)]).float().clamp_min(1.0) / n
    p_n, p_0, p_p = cnt[0], cnt[1], cnt[2]
    if p_0 < 0.5:
      deficit = 0.5 - p_0
      p_n, p_p = p_n - p_n / (p_n + p_p) * deficit, p_p - p_p / (p_n + p_p) * deficit
      p_0 = torch.tensor(0.5)
    info = -torch.log2(torch.stack([p_n, p_0, p_p]))
    w = w.detach()
    wp, wn = c[0].detach(), c[1].detach()
    lam_n = wn * (2 * w.min().abs() - wn) / (info[0] - info[1])
    lam_p = wp * (2 * w.max().abs() - wp) / (info[2] - info[1])
    lam = self.gamma * delta * torch.minimum(lam_n, lam_p)
    return self._argmin(d + lam * info.view(3, *([1] * w.dim())))

  def step(self, x, y):
    """One EC2T training step on the batch `(x, y)`; returns the loss."""
    torch = self.torch
    for opt in self.optimizers:
      opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(self.net(x), y)
    loss.backward()
    for p, w, c, a in zip(self.layers, self.latent, self.centroids, self.assignment, strict=True):
      g = p.grad
      pos, neg, zero = a == 2, a == 0, a == 1
      w.grad = (c[0] * pos + c[1] * neg + zero).detach() * g
      c.grad = torch.stack([(g * pos).sum(), -(g * neg).sum()])
      p.grad = None
    for opt in self.optimizers:
      opt.step()
    with torch.no_grad():
      for w, c in zip(self.latent, self.centroids, strict=True):
        c.clamp_(min=0.675 * w.std())
    self.assignment = [
      self._assign(w, c, d) for w, c, d in zip(self.latent, self.centroids, self.delta, strict=True)
    ]
    self._write_kernels()
    return loss


def bench_torch(args) -> dict[str, Any]:
  """Images/s of ResNet-20's CPU train step, PyTorch against ours: Adam and EC2T, interleaved.

  PyTorch's side is its full-precision Adam step and `TorchEC2T`; ours is
  `optax.adam` and `ec2t_jax.ec2t` with the default mask. All four steps run in
  turn, `--steps` times, and each reports its median. Pin the process to one
  core with one thread per side for a fair ratio
  (`OMP_NUM_THREADS=1 taskset -c 1 python bench/performance.py torch`).
  """
  import torch  # Only this benchmark needs it (CPU build; see the Makefile).

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'tests'))
  import torch_models

  torch.manual_seed(0)
  x = torch.randn(args.batch, 3, 32, 32)
  y = torch.randint(0, 10, (args.batch,))
  fp_net = torch_models.CifarResNet(depth=20, num_classes=10)
  fp_opt = torch.optim.Adam(fp_net.parameters(), lr=1e-4)

  def torch_adam():
    fp_opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(fp_net(x), y)
    loss.backward()
    fp_opt.step()
    return loss

  ec2t_net = torch_models.CifarResNet(depth=20, num_classes=10)
  # The default selection: every conv inside the residual blocks (stem and fc stay fp).
  ternary = [n for n, p in ec2t_net.named_parameters() if n.startswith('layer') and p.dim() == 4]
  torch_ec2t = TorchEC2T(torch, ec2t_net, ternary)

  model, images, labels, variables, mask = _setup('resnet20', args.batch)
  steps = {'torch_adam': torch_adam, 'torch_ec2t': lambda: torch_ec2t.step(x, y)}
  for name, tx in _optimizers(mask):
    step = make_step(model, tx)
    # Copies: each step donates its own state.
    carry = [jax.tree.map(jnp.copy, variables[k]) for k in ('params', 'batch_stats')]
    carry.append(tx.init(carry[0]))

    def jax_step(step=step, carry=carry):
      *new, loss = step(*carry, images, labels)
      carry[:] = new
      return loss.block_until_ready()

    steps[f'jax_{name}'] = jax_step
  for fn in steps.values():
    fn()  # Compile / warm up.
  times: dict[str, list[float]] = {name: [] for name in steps}
  for _ in range(args.steps):
    for name, fn in steps.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  result: dict[str, Any] = {
    'model': 'resnet20',
    'batch': args.batch,
    'steps': args.steps,
    'torch_version': torch.__version__,
    'torch_threads': torch.get_num_threads(),
    'ternary_layers': len(ternary),
  }
  for name, ts in times.items():
    result[f'{name}_ms'] = 1e3 * statistics.median(ts)
    result[f'{name}_images_per_s'] = args.batch / statistics.median(ts)
  result['jax_ec2t_over_torch_ec2t'] = result['torch_ec2t_ms'] / result['jax_ec2t_ms']
  result['jax_adam_over_torch_adam'] = result['torch_adam_ms'] / result['jax_adam_ms']
  result['jax_ec2t_over_jax_adam'] = result['jax_ec2t_ms'] / result['jax_adam_ms']
  result['torch_ec2t_over_torch_adam'] = result['torch_ec2t_ms'] / result['torch_adam_ms']
  print(json.dumps(result, indent=1), flush=True)
  return result


# --- Where a CPU step's time goes --------------------------------------------------------------


def bench_profile(args) -> list[dict[str, Any]]:
  """Per-op-kind time of one model's jitted Adam train step, from a JAX profiler trace.

  Runs `--steps` steps under `jax.profiler.trace`, reads the XLA op events of
  the trace and sums them by kind (the op name without its `.N` suffix:
  `convolution`, `ynn_fusion`, `transpose_copy_fusion`, ...), per step.
  """
  import collections
  import glob
  import gzip
  import re
  import tempfile

  model, images, labels, variables, _ = _setup(args.model, args.batch)
  tx = optax.adam(1e-4)
  step = make_step(model, tx)
  carry = [variables['params'], variables.get('batch_stats', {}), tx.init(variables['params'])]
  for _ in range(2):
    *carry, loss = step(*carry, images, labels)
    loss.block_until_ready()
  with tempfile.TemporaryDirectory() as trace_dir:
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir):
      for _ in range(args.steps):
        *carry, loss = step(*carry, images, labels)
        loss.block_until_ready()
    wall = (time.perf_counter() - t0) / args.steps
    (path,) = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)['traceEvents']
  kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
  for e in events:
    name = e.get('name', '')
    if e.get('ph') != 'X' or name.startswith(('ThunkExecutor', '$', 'end:', 'Pjit', 'Common')):
      continue
    kind = kinds[re.sub(r'\.\d+$', '', name)]
    kind[0] += 1
    kind[1] += e['dur'] / 1e3
  rows = [
    {'kind': k, 'ops_per_step': n // args.steps, 'ms_per_step': ms / args.steps}
    for k, (n, ms) in sorted(kinds.items(), key=lambda kv: -kv[1][1])
  ]
  total = sum(r['ms_per_step'] for r in rows)
  print(f'{args.model}, batch {args.batch}: {1e3 * wall:.0f} ms per step, {total:.0f} ms in ops')
  print(_table(['op kind', 'ops per step', 'ms per step'], [list(r.values()) for r in rows[:15]]))
  return rows


def main(argv=None):
  """Parses the subcommand, runs it, prints the table and writes `--json`."""
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  sub = parser.add_subparsers(dest='command', required=True)

  def add(name, fn, **defaults):
    p = sub.add_parser(name)
    p.set_defaults(fn=fn)
    p.add_argument('--json', default='')
    for key, value in defaults.items():
      p.add_argument(f'--{key}', type=type(value), default=value)
    return p

  add(
    'step',
    bench_step,
    models='lenet5,resnet20,micronet_c100',
    dtypes='float32,bfloat16',
    batch=128,
    steps=5,
    fence_updates=1,
  )
  add(
    'update',
    bench_update,
    models='resnet20,micronet_c100,resnet50',
    repeats=5,
    fence_updates=1,
  )
  add(
    'compile',
    bench_compile,
    models='resnet20,micronet_c100,efficientnet_b1',
    batch=128,
    optimizers='adam,ec2t_grouped,ec2t_per_layer',
    part='step',
    cache_dir='',
    repeats=1,
  )
  add('memory', bench_memory, model='micronet_c100', batch=128, child='')
  add(
    'pipeline',
    bench_pipeline,
    dataset='cifar10',
    model='resnet20',
    batch=128,
    batches=40,
    steps=5,
    examples=8192,
    workers='0,2',
    target=0.0,
  )
  add('torch', bench_torch, batch=128, steps=10)
  add('profile', bench_profile, model='resnet20', batch=128, steps=3)
  add('eval', bench_eval, models='lenet5,resnet20,micronet_c100', batch=512, repeats=5)
  args = parser.parse_args(argv)
  # 0 measures the EC2T update without its optimization barrier (see transforms).
  transforms._FENCE_UPDATES = bool(getattr(args, 'fence_updates', 1))
  result = args.fn(args)
  if args.json and result:
    with open(args.json, 'w') as f:
      json.dump({'benchmark': args.command, 'machine': _machine(), 'result': result}, f, indent=1)
  return result


if __name__ == '__main__':
  main()
