"""Rows of the reliability table: silent wrong numbers (S) and problems found late (L).

Each `@case` registers one row of docs/reliability.md (see
`tests/reliability_cases_test.py`, which runs them as `test_case[ID]`).
"""

from __future__ import annotations

import os
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reliability_registry import case

import ec2t_jax
from ec2t_jax import export, models
from ec2t_jax.training import datasets, train
from ec2t_jax.training import parse as parse_lib
from ec2t_jax.training.input_pipeline import transforms as pipeline_transforms

# --- helpers ---------------------------------------------------------------------------------


def _predictor(tmp_path):
  """A randomly initialised LeNet-5 saved with its model info, and its predictor."""
  model = models.create('lenet5', num_classes=10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  path = str(tmp_path / 'lenet5.ec2t')
  info = {'name': 'lenet5', 'num_classes': 10, 'input_shape': [28, 28, 1]}
  export.save(path, jax.device_get(variables), model={**info, 'normalization': [[0.13], [0.31]]})
  return export.load_predictor(path)


def _images(n=16):
  return datasets.load_embedded_mnist()['test'][0][:n]


def _npz(tmp_path, name='data.npz', **arrays):
  """An npz dataset: 8x8 grey images, labels 0..2 unless given."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, size=(24, 8, 8), dtype=np.uint8)
  y = np.arange(24) % 3
  base = {'x_train': x, 'y_train': y, 'x_test': x[:6], 'y_test': y[:6]}
  path = tmp_path / name
  np.savez(path, **{**base, **arrays})
  return f'npz:{path}'


def _refused_before_claim(tmp_path, config, message):
  """`train_and_evaluate(config)` is refused with `message`; the workdir is not created."""
  workdir = tmp_path / 'never_created'
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


_USER_MODELS = """
from flax import linen as nn
import jax.numpy as jnp


class Five(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(5)(x.reshape((x.shape[0], -1)))


class IntParam(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train=False):
    self.param('count', lambda key: jnp.zeros((), jnp.int32))
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def not_a_module(num_classes):
  return lambda x: x
"""


def _user_models(tmp_path, monkeypatch):
  """`user_models_rel:Five|IntParam|not_a_module`, importable by `config.model`."""
  (tmp_path / 'user_models_rel.py').write_text(textwrap.dedent(_USER_MODELS))
  monkeypatch.syspath_prepend(str(tmp_path))
  return 'user_models_rel'


# --- S: silent wrong numbers -------------------------------------------------------------------


@case(
  'S01',
  'The predictor of an exported file given integer pixels that are not uint8 (int64, int32, '
  'uint16, int8, bool).',
  '`export.load_predictor(path)(x_uint8.astype(np.int64))`',
  'Refused in one line: `images of dtype int64: the network was trained on uint8 pixels (0..255, '
  'divided by 255); pass uint8 ... or float pixels on [0, 1]` (before: read as floats on [0, 1], '
  'accuracy 0.7695 -> 0.7422 with no error). uint8 and `x / 255` floats give the same logits.',
)
def check_s01(tmp_path):
  predict = _predictor(tmp_path)
  x = _images()
  for dtype in (np.int64, np.int32, np.uint16, np.int8, np.bool_):
    with pytest.raises(ValueError, match=f'images of dtype {np.dtype(dtype).name}: .* uint8'):
      predict(x.astype(dtype))
  # Both paths scale one uint8 value by 1/255 in float32 (a product vs a quotient, at most
  # 1 ulp apart); through LeNet-5 that stays far below 1e-4 of logits of order 1.
  np.testing.assert_allclose(
    predict(x), predict(x.astype(np.float32) / 255.0), rtol=1e-4, atol=1e-4
  )


@case(
  'S02',
  'Float pixels on 0..255 given to the predictor (ours: the float twin of S01).',
  '`export.load_predictor(path)(x_uint8.astype(np.float32))`',
  'Refused: `float images hold values in [0, 255]; float pixels must be on [0, 1] (uint8 pixels '
  '/ 255) ...`; NaN pixels too.',
)
def check_s02(tmp_path):
  predict = _predictor(tmp_path)
  x = _images()
  with pytest.raises(ValueError, match=r'values in \[0, 255\]; float pixels must be on \[0, 1\]'):
    predict(x.astype(np.float32))
  nan = (x / 255.0).astype(np.float32)
  nan[0, 0, 0] = np.nan
  with pytest.raises(ValueError, match='float pixels must be on'):
    predict(nan)


@case(
  'S03',
  'Image loaders given pixels of more than 8 bits: 16-bit grey PNGs, 32-bit int or float TIFFs '
  'in a `folder:` dataset; a uint16 tfds dataset; a custom source returning uint16 records.',
  '`main.py ... --config.dataset=folder:DIR` (16-bit PNGs)',
  '16-bit grey pixels are scaled to 8 bits (`v·255/65535`; before: PIL clipped them at 255, '
  'most of the image white); modes I and F are refused in one line naming the file; tfds '
  'images that are not uint8 are refused naming the dataset; the grain pipeline refuses a '
  'record of another integer dtype.',
)
def check_s03(tmp_path, monkeypatch):
  import PIL.Image

  from ec2t_jax.training.datasets import folder

  wide = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1000).astype(np.uint16)
  for c in ('a', 'b'):
    (tmp_path / 'd16' / c).mkdir(parents=True)
    for i in range(5):
      PIL.Image.fromarray(wide).save(tmp_path / 'd16' / c / f'{i}.png')
  splits, _, _ = folder.load_image_folder(tmp_path / 'd16')
  expected = ((wide.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
  np.testing.assert_array_equal(splits['train'][0][0, ..., 0], expected)
  for mode, array in (('I', wide.astype(np.int32)), ('F', wide.astype(np.float32))):
    root = tmp_path / f'd{mode}'
    for c in ('a', 'b'):
      (root / c).mkdir(parents=True)
      for i in range(5):
        PIL.Image.fromarray(array).save(root / c / f'{i}.tif')
    with pytest.raises(ValueError, match=rf'0\.tif.* \(PIL mode {mode}\), whose range is unknown'):
      folder.load_image_folder(root)
  with pytest.raises(ValueError, match='holds a uint16 image; the pipeline reads uint8'):
    pipeline_transforms.SelectFeatures().map({'image': np.zeros((4, 4, 1), np.uint16), 'label': 0})
  _check_uint16_tfds_refused(monkeypatch)


def _check_uint16_tfds_refused(monkeypatch):
  """A tfds builder whose images are uint16 (a stand-in builder: nothing is prepared)."""
  import types

  import tensorflow_datasets as tfds

  from ec2t_jax.training.datasets import tfds_source

  features = {
    'image': tfds.features.Image(shape=(4, 4, 1), dtype=np.uint16),
    'label': tfds.features.ClassLabel(num_classes=2),
  }
  info = types.SimpleNamespace(features=features, splits={}, version='1.0.0')
  fake = types.SimpleNamespace(
    builder=lambda name, data_dir: types.SimpleNamespace(info=info), features=tfds.features
  )
  monkeypatch.setattr(tfds_source, '_tfds', lambda: fake)
  with pytest.raises(ValueError, match="'tfds:deep' stores uint16 images; the input pipeline"):
    tfds_source._tfds_spec('deep', data_dir='', image_size=None)


@case(
  'S04',
  'More classes in the data than the run has (`num_classes=5` on 10-class MNIST, or a model '
  'with 5 outputs), then `skip_nonfinite=True` as the old error advised; any run whose every '
  'step was skipped.',
  '`T TINY --config.num_classes=5` (then `--config.skip_nonfinite=True`)',
  'Refused before the workdir is created: `config.num_classes=5 is too small: dataset mnist has '
  '10 classes ...`; a model returning 5 logits: `returns outputs of shape (1, 5) ... the run has '
  '10 classes`. A run whose every step is skipped stops with `every one of the N steps this run '
  'took was skipped ...` before its final checkpoint, and writes no summary (before: exit 0, '
  'accuracy 0.1875, loss NaN).',
)
def check_s04(tmp_path, tiny_mnist, monkeypatch):
  user_models = _user_models(tmp_path, monkeypatch)
  _refused_before_claim(tmp_path, tiny_mnist(num_classes=5), r'num_classes=5 is too small')
  five = tiny_mnist(model=f'{user_models}:Five')
  _refused_before_claim(tmp_path, five, r'outputs of shape \(1, 5\) .* 10 classes')
  original = train.train_step

  def skipped_step(state, batch, rng, **kwargs):
    _, metrics = original(state, batch, rng, **kwargs)
    return state, {**metrics, 'nonfinite': jnp.ones((), jnp.float32)}

  monkeypatch.setattr(train, 'train_step', skipped_step)
  workdir = tmp_path / 'skipped'
  with pytest.raises(train.NonFiniteError, match='every one of the 9 steps this run took was'):
    train.train_and_evaluate(tiny_mnist(skip_nonfinite=True), str(workdir))
  assert not (workdir / 'summary.json').exists()


@case(
  'S05',
  'An npz `y_train` of dtype uint64 holding 2**63 (and the same label as a test label).',
  '`np.savez(..., y_train=np.array([..., 2**63], np.uint64))`; `main.py --config.dataset=npz:...`',
  'Refused before the workdir is touched: `y_train holds the label 9223372036854775808 (index '
  '5), too large for int64; labels must be class ids 0..K-1` (before: checked before the cast, '
  'wrapped to -9.2e18, trained, exit 0). Every label check runs on the int64 values the '
  'pipeline uses.',
)
def check_s05(tmp_path):
  y = (np.arange(24) % 3).astype(np.uint64)
  y[5] = 2**63
  with pytest.raises(ValueError, match=r'y_train holds the label 9223372036854775808 \(index 5\)'):
    datasets.get_spec(_npz(tmp_path, 'a.npz', y_train=y))
  y_test = (np.arange(6) % 3).astype(np.uint64)
  y_test[2] = 2**64 - 1
  with pytest.raises(ValueError, match=r'y_test holds the label 18446744073709551615 .* too large'):
    datasets.get_spec(_npz(tmp_path, 'b.npz', y_test=y_test))
  with pytest.raises(ValueError, match=r'holds the negative label -3 \(index 1\)'):
    datasets.get_spec(_npz(tmp_path, 'c.npz', y_test=np.array([0, -3, 1, 2, 0, 1], np.int8)))


@case(
  'S06',
  'Library: a transformation chained after `ec2t` (`optax.chain(ec2t(mask), optax.scale(0.5))`).',
  '3 steps of `optax.chain(ec2t_jax.ec2t(mask), optax.scale(0.5))`',
  "A warning, once: `ternary_training: the params ['w'] (24 values) are not the ternary kernels "
  'of its last update: a transformation after it changed its updates (e.g. optax.scale), or '
  'they were not applied; ...` (before: 5 '
  'distinct kernel values, no warning). The README says what may follow `ec2t`.',
)
def check_s06():
  params = {'w': jnp.linspace(-1.0, 1.0, 24).reshape(4, 6), 'b': jnp.zeros(6)}
  mask = {'w': True, 'b': False}

  def run(tx):
    state, p = tx.init(params), params
    update = jax.jit(tx.update)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      for _ in range(3):
        updates, state = update(jax.tree.map(lambda x: 0.1 + 0 * x, p), state, p)
        p = optax.apply_updates(p, updates)
      jax.effects_barrier()
    return p, [str(w.message) for w in caught]

  p, caught = run(ec2t_jax.ec2t(mask))
  assert len(np.unique(p['w'])) <= 3 and not caught
  p, caught = run(optax.chain(ec2t_jax.ec2t(mask), optax.scale(0.5)))
  assert len(np.unique(p['w'])) > 3
  assert (
    len(caught) == 1 and "the params ['w'] (24 values)" in caught[0] and 'after it' in caught[0]
  )
  # warn_if_moved=False (the trainer's, which applies updates unchanged) drops the check only.
  unchecked, caught = run(ec2t_jax.ec2t(mask, warn_if_moved=False))
  assert not caught
  np.testing.assert_array_equal(unchecked['w'], run(ec2t_jax.ec2t(mask))[0]['w'])
  assert not run(optax.chain(ec2t_jax.ec2t(mask, warn_if_moved=False), optax.scale(0.5)))[1]


@case(
  'S07',
  'Library: `ternarize` with a state built for params of another shape.',
  '`ec2t_jax.ternarize(params_4x6, ec2t(mask).init(params_8x6))`',
  "`params leaf 'w' has shape (4, 6), but opt_state holds a kernel of shape (8, 6) for it: the "
  'state was built for other params; call tx.init(params) on these params` (before: silently '
  'returned an 8x6 kernel). Every reader of kernels from a state checks the same '
  '(`compressed_kernels`: also `export.save(path, variables, state)`).',
)
def check_s07(tmp_path):
  tx = ec2t_jax.ec2t({'w': True})
  state = tx.init({'w': jnp.linspace(-1.0, 1.0, 48).reshape(8, 6)})
  with pytest.raises(ValueError, match=r"'w' has shape \(4, 6\), but .* \(8, 6\)"):
    ec2t_jax.ternarize({'w': jnp.ones((4, 6))}, state)
  variables = {'params': {'w': jnp.ones((4, 6))}, 'batch_stats': {}}
  with pytest.raises(ValueError, match=r"'w' has shape \(4, 6\), but .* \(8, 6\)"):
    export.save(str(tmp_path / 'x.ec2t'), variables, state)


@case(
  'S08',
  'Library: one `inf` (or NaN) in an initial kernel.',
  '`ec2t_jax.ec2t(mask).init({"w": w.at[0, 0].set(jnp.inf)})`',
  "Refused at `init`: `ternary_training selects ['w'], which holds 1 NaN/inf values; its "
  'levels would be non-finite and the layer all zeros: initialize the params with finite '
  'values` (before: the whole layer became exact zeros). The same for ECP and the baselines '
  '(absmean, TWN), whose `init` shares the check.',
)
def check_s08():
  from ec2t_jax import baselines, twn

  w = jnp.linspace(-1.0, 1.0, 24).reshape(4, 6)
  for bad in (jnp.inf, jnp.nan):
    with pytest.raises(ValueError, match=r"selects \['w'\], which holds 1 NaN/inf values"):
      ec2t_jax.ec2t({'w': True}).init({'w': w.at[0, 0].set(bad)})
    for factory in (baselines.absmean_ternary, twn.twn_ternary):
      with pytest.raises(ValueError, match=r'is given w, which holds 1 NaN/inf values'):
        factory({'w': True}).init({'w': w.at[0, 0].set(bad)})


# --- L: found late, or stuck -------------------------------------------------------------------


@case(
  'L01',
  'Settings that used to fail only at the summary or after the claim: '
  '`magnitude_prune.fraction=5`, `seed=-5`, every stage at 0 epochs.',
  '`T TINY --config.magnitude_prune.fraction=5` (or `--config.seed=-5`, or all `num_epochs=0`)',
  'Each refused before the workdir is created, with every bad field in one error: '
  '`config.magnitude_prune.fraction must be in [0, 1) ...`, `config.seed must be an integer in '
  '[0, 2**31), got -5`, `every stage has 0 epochs, so the run would train nothing ...` (before: '
  'a whole run, then a failing summary and a workdir refusing the corrected value; a workdir '
  "created before the refusal; a random network's accuracy, rewritten on every rerun).",
)
def check_l01(tmp_path, tiny_mnist):
  _refused_before_claim(
    tmp_path, tiny_mnist(**{'magnitude_prune.fraction': 5.0}), r'fraction must be in \[0, 1\)'
  )
  _refused_before_claim(tmp_path, tiny_mnist(seed=-5), r'seed must be an integer .* got -5')
  zero = {'fp.num_epochs': 0, 'ec2t.num_epochs': 0, 'ec2t.frozen_epochs': 0}
  _refused_before_claim(tmp_path, tiny_mnist(**zero), 'every stage has 0 epochs')
  both = tiny_mnist(seed=-5, **{'magnitude_prune.fraction': 5.0})
  with pytest.raises(parse_lib.ConfigError) as info:
    parse_lib.parse(both)
  assert len(info.value.problems) == 2


@case(
  'L02',
  'User models that cannot train: a factory returning a non-Module, a model with an int32 param.',
  '`T TINY --config.model=mod:not_a_module` (or `mod:IntParam`)',
  'Refused before the workdir is created: `config.model=... built a function, not a flax.linen '
  'Module ...`; `... has params that are not floating point (count); ... keep integer state in '
  "another collection than 'params'` (before: an AttributeError traceback; a JAX grad error "
  'after the claim).',
)
def check_l02(tmp_path, tiny_mnist, monkeypatch):
  mod = _user_models(tmp_path, monkeypatch)
  _refused_before_claim(tmp_path, tiny_mnist(model=f'{mod}:not_a_module'), 'not a flax.linen')
  _refused_before_claim(
    tmp_path, tiny_mnist(model=f'{mod}:IntParam'), r'not floating point \(count\)'
  )


@case(
  'L03',
  'One training label equal to 10**8 in an npz dataset.',
  '`y_train[7] = 10**8; main.py ... --config.dataset=npz:data.npz`',
  'Refused before the workdir is touched: `y_train holds the label 100000000 (index 7), which '
  'makes 100000001 classes for 24 training examples; labels must be class ids 0..K-1 (renumber '
  'them ...)` (before: a 10**8-class model was built and died of memory after 90 s).',
)
def check_l03(tmp_path, tiny_mnist):
  y = np.arange(24) % 3
  y[7] = 10**8
  dataset = _npz(tmp_path, y_train=y)
  with pytest.raises(ValueError, match=r'label 100000000 \(index 7\), which makes 100000001'):
    datasets.get_spec(dataset)
  _refused_before_claim(tmp_path, tiny_mnist(dataset=dataset), 'makes 100000001 classes')


@case(
  'L04',
  '1x1 images with LeNet-5 (and 8x8 ones, ours: too small for its two 5x5 conv + pool stages).',
  '`main.py ... --config.dataset=npz:tiny_images.npz` (x_train of shape (N, 1, 1))',
  'Refused before the workdir is created: `config.model=lenet5 cannot run on images of shape '
  '(1, 1, 1) (ZeroDivisionError: ...); check config.model_kwargs, config.image_size or the '
  'dataset` (before: a ZeroDivisionError traceback).',
)
def check_l04(tmp_path, tiny_mnist):
  x = np.zeros((24, 1, 1), np.uint8)
  dataset = _npz(tmp_path, x_train=x, x_test=x[:6])
  _refused_before_claim(
    tmp_path, tiny_mnist(dataset=dataset), r'cannot run on images of shape \(1, 1, 1\)'
  )


@case(
  'L05',
  "A frozen stage that starts from the best checkpoint (`frozen_start_from='best'`) after that "
  'checkpoint was deleted, or its data file truncated, between SIGTERM and the rerun.',
  '`T TINY --config.ec2t.frozen_start_from=best`, SIGTERM after the best save, `rm -rf W/best` '
  '(or truncate its files), rerun',
  "One line each, advising what the program accepts: `stage 'frozen' starts from the best "
  "checkpoint (start_from='best') but W/best holds none (deleted?); restore W/best from a "
  'backup, or start over with --config.overwrite=True ...`; a damaged one: `... but checkpoint '
  "6 in W/best cannot be read (...); restore ...` (before: advice of start_from='last', which "
  'the config check refuses, and a bare orbax traceback).',
  slow=True,
)
def check_l05(tmp_path, tiny_mnist, signal_at):
  import shutil
  import signal

  config = tiny_mnist(**{'ec2t.num_epochs': 2, 'ec2t.frozen_start_from': 'best'})
  workdir = str(tmp_path / 'run')
  signal_at(signal.SIGTERM, 7)  # Step 6 ends the first EC2T epoch and saves the best.
  assert train.train_and_evaluate(config, workdir)['preempted']
  best = os.path.join(workdir, 'best')
  shutil.copytree(best, str(tmp_path / 'best_copy'))
  shutil.rmtree(best)
  with pytest.raises(ValueError, match=r"best'\) but .*best' holds none .*overwrite=True"):
    train.train_and_evaluate(config, workdir)
  shutil.rmtree(best, ignore_errors=True)  # The refused rerun made an empty one.
  shutil.copytree(str(tmp_path / 'best_copy'), best)
  for d, _, names in os.walk(best):
    for name in names:
      if os.path.basename(d) == 'd':  # The array data files (not metadata, not metrics).
        with open(os.path.join(d, name), 'r+b') as f:
          f.truncate(os.path.getsize(os.path.join(d, name)) // 2)
  with pytest.raises(ValueError, match=r'checkpoint 6 in .*best. cannot be read .*overwrite=True'):
    train.train_and_evaluate(config, workdir)


@case(
  'L06',
  'A corrupt `sweep.json` (or a point whose summary.json is damaged).',
  "`echo '{' > DIR/sweep.json; python -m ec2t_jax.sweep --workdir=DIR ...`",
  "`the sweep record 'DIR/sweep.json' is not valid JSON (...); restore it, or delete it to "
  'record the sweep anew` (before: advised `--config.overwrite=True`, which the sweep refuses).',
)
def check_l06(tmp_path, tiny_mnist):
  from ec2t_jax import sweep

  (tmp_path / 'sweep.json').write_text('{')
  with pytest.raises(ValueError, match='not valid JSON .* delete it to record the sweep') as info:
    sweep._record(str(tmp_path), tiny_mnist(), None, [(0.1, 0.3)])
  assert 'overwrite' not in str(info.value)
  (tmp_path / 'summary.json').write_text('[1]')
  with pytest.raises(ValueError, match='delete its point directory') as info:
    sweep._summary(str(tmp_path / 'summary.json'))
  assert 'overwrite' not in str(info.value)


@case(
  'L07',
  'A `folder:` dataset with one truncated PNG among good ones (ours).',
  '`head -c 100 good.png > DIR/cat/7.png; main.py ... --config.dataset=folder:DIR`',
  "Refused before the workdir is created, naming the file: `dataset 'folder:DIR': cannot read "
  "the image 'DIR/a/3.png' (...); remove or replace the file`.",
)
def check_l07(tmp_path, tiny_mnist):
  import PIL.Image

  root = tmp_path / 'images'
  pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
  for c in ('a', 'b'):
    (root / c).mkdir(parents=True)
    for i in range(5):
      PIL.Image.fromarray(pixels).save(root / c / f'{i}.png')
  data = (root / 'a' / '3.png').read_bytes()
  (root / 'a' / '3.png').write_bytes(data[: len(data) // 2])
  config = tiny_mnist(dataset=f'folder:{root}')
  _refused_before_claim(tmp_path, config, r"cannot read the image '.*3\.png' .* remove or replace")


@case(
  'L08',
  'A run stopped by a NaN step, rerun as its error advised (ours: the NonFiniteError advice).',
  '`T TINY` stopped at a NaN loss; rerun with `--config.skip_nonfinite=True`',
  'The error advises only what the program accepts: `... Rerun with --config.skip_nonfinite=True '
  'to skip such steps (it resumes from that checkpoint), or start over with a lower learning '
  'rate (--config.overwrite=True, or another --workdir)`; skip_nonfinite is a resumable field '
  '(before: both pieces of advice were refused as a different config).',
)
def check_l08(tmp_path, tiny_mnist, monkeypatch):
  from ec2t_jax.training import workdir as workdir_lib

  original = train.train_step

  def nan_step(state, batch, rng, **kwargs):
    _, metrics = original(state, batch, rng, **kwargs)
    return state, {**metrics, 'nonfinite': jnp.ones((), jnp.float32)}

  monkeypatch.setattr(train, 'train_step', nan_step)
  workdir = str(tmp_path / 'run')
  with pytest.raises(train.NonFiniteError, match='Rerun with --config.skip_nonfinite=True') as e:
    train.train_and_evaluate(tiny_mnist(), workdir)
  assert 'overwrite=True, or another --workdir' in str(e.value)
  lock = workdir_lib.claim_workdir(parse_lib.parse(tiny_mnist(skip_nonfinite=True)), workdir)
  lock.release()  # Accepted: the advice resumes.
