"""The packaged recipes (ec2t_jax.configs), the repository's configs/, and --config lookup."""

import importlib
import os

import pytest

import ec2t_jax.configs
from ec2t_jax import main as program

VARIANTS = {
  'default': [()],
  'mnist': [(), ('smoke',), ('vit',), ('vit_smoke',)],
  'cifar10': [(), ('resnet20',), ('micronet',), ('smoke',)],
  'cifar100': [(), ('micronet',), ('resnet20',), ('smoke',)],
  'imagenet': [(), ('efficientnet_b1',), ('resnet18',), ('smoke',)],
}


def test_every_recipe_is_packaged_and_has_variants():
  assert sorted(ec2t_jax.configs.RECIPES) == sorted(VARIANTS)
  for name, variants in VARIANTS.items():
    assert os.path.isfile(ec2t_jax.configs.recipe_path(name))
    recipe = importlib.import_module(f'ec2t_jax.configs.{name}')
    for args in variants:
      config = recipe.get_config(*args)
      assert config.model and config.dataset


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_repository_configs_are_the_packaged_recipes(name):
  repository = importlib.import_module(f'configs.{name}')
  packaged = importlib.import_module(f'ec2t_jax.configs.{name}')
  assert repository.get_config is packaged.get_config


def test_unknown_variant_is_refused():
  from ec2t_jax.configs import mnist

  with pytest.raises(ValueError, match="unknown variant 'big'"):
    mnist.get_config('big')


@pytest.mark.parametrize('value', ['mnist:smoke', 'mnist.py:smoke', 'configs/mnist.py:smoke'])
def test_a_missing_path_names_a_packaged_recipe(value, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert program.resolve_config(value) == ec2t_jax.configs.recipe_path('mnist') + ':smoke'
  assert program.resolve_config(value.split(':')[0]) == ec2t_jax.configs.recipe_path('mnist')


def test_a_path_that_exists_is_used_as_given(tmp_path, monkeypatch, repo_root):
  monkeypatch.chdir(repo_root)
  assert program.resolve_config('configs/mnist.py:smoke') == 'configs/mnist.py:smoke'
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'mnist').write_text('def get_config():\n  return None\n')
  assert program.resolve_config('mnist:x') == 'mnist:x'
  own = str(tmp_path / 'cifar10.py')
  (tmp_path / 'cifar10.py').write_text('')
  assert program.resolve_config(f'{own}:smoke') == f'{own}:smoke'


@pytest.mark.parametrize('value', ['nope', 'nope.py:smoke', 'elsewhere/mnist.py', '', ':smoke'])
def test_neither_a_file_nor_a_recipe_is_an_error(value, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match='names no packaged recipe .*mnist'):
    program.resolve_config(value)


def test_config_flags_are_resolved_in_every_spelling(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = ec2t_jax.configs.recipe_path('cifar10')
  argv = ['prog', '--config=cifar10:smoke', '--workdir=w', '--config.seed=1']
  assert program.resolve_config_args(argv) == [
    'prog',
    f'--config={path}:smoke',
    '--workdir=w',
    '--config.seed=1',
  ]
  assert program.resolve_config_args(['prog', '-config', 'cifar10']) == ['prog', '-config', path]
  assert program.resolve_config_args(['prog', '--', '--config=x']) == ['prog', '--', '--config=x']


@pytest.mark.parametrize(
  'name, variant', [(n, v) for n, variants in VARIANTS.items() for v in variants]
)
def test_every_recipe_validates_with_its_stages(name, variant):
  from ec2t_jax.training import parse as parse_lib
  from ec2t_jax.training import train

  config = importlib.import_module(f'ec2t_jax.configs.{name}').get_config(*variant)
  if config.needs_init_from:
    config.init_from = '/weights/pretrained.pth'  # Not read by the validation.
  train.validate_config(config)
  specs = parse_lib.stage_specs(config)
  # A frozen stage starts from the best EC2T checkpoint in the published recipes.
  if name in ('cifar10', 'cifar100', 'imagenet') and variant != ('smoke',):
    assert all(s.start_from == 'best' for s in specs if s.kind == 'frozen' and s.num_epochs)
