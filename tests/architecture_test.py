"""The layering rules of docs/architecture.md, checked on the sources (nothing is imported).

* Module-level imports between the package's modules form no circle.
* The core optimizer (what `import ec2t_jax` loads) imports neither the training
  program nor the tools, anywhere, and no heavy library at module level.
* Below the training program nothing imports it back: models, the core and the
  jaxpr walker never import `ec2t_jax.training`.
* Modules stay under 700 lines, outside the model catalogue.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, 'ec2t_jax')

# What `import ec2t_jax` loads (tests/packaging_test.py checks the loaded set itself).
CORE = (
  'ec2t_jax',
  'ec2t_jax.alias',
  'ec2t_jax.baselines',
  'ec2t_jax.fused',
  'ec2t_jax.masks',
  'ec2t_jax.methods',
  'ec2t_jax.state_utils',
  'ec2t_jax.ternary',
  'ec2t_jax.transforms',
  'ec2t_jax.tree_util',
  'ec2t_jax.twn',
)
HEAVY = ('flax', 'orbax', 'grain', 'tensorflow_datasets', 'ml_collections', 'matplotlib', 'torch')
MAX_LINES = 700


def _modules() -> dict[str, str]:
  """`{dotted module name: path}` of every source file of the package."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if not name.endswith('.py'):
        continue
      path = os.path.join(root, name)
      parts = os.path.relpath(path, REPO)[: -len('.py')].split(os.sep)
      if parts[-1] == '__init__':
        parts = parts[:-1]
      out['.'.join(parts)] = path
  return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
  """The package module `name` refers to (a module, or the package holding a name)."""
  while name and name not in MODULES:
    name = name.rpartition('.')[0]
  return name or None


def _imports(path: str, module: str, *, top_level_only: bool) -> set[str]:
  """The package modules that `path` imports (at module level, or anywhere)."""
  tree = ast.parse(open(path).read())
  nodes = tree.body if top_level_only else list(ast.walk(tree))
  if top_level_only:  # Imports under module-level `if`/`try` run at import time too.
    nodes = [n for stmt in tree.body for n in ast.walk(stmt) if _at_import_time(stmt, n)]
  found = set()
  for node in nodes:
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [f'{node.module}.{a.name}' for a in node.names]
    for name in names:
      if name.split('.')[0] == 'ec2t_jax':
        target = _resolve(name)
        if target and target != module:
          found.add(target)
  return found


def _at_import_time(stmt: ast.stmt, node: ast.AST) -> bool:
  """Whether `node` (inside module-level `stmt`) runs when the module is imported."""
  if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
    return False
  if isinstance(stmt, ast.ClassDef):
    return False  # Imports inside class bodies are not used in this package.
  return isinstance(node, (ast.Import, ast.ImportFrom))


def _graph(*, top_level_only: bool) -> dict[str, set[str]]:
  return {m: _imports(p, m, top_level_only=top_level_only) for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def _without_package_reexports(graph: dict[str, set[str]]) -> dict[str, set[str]]:
  """Drops a package `__init__`'s edges to its own submodules (its re-exports)."""
  return {
    m: {t for t in targets if not t.startswith(m + '.')}
    if MODULES[m].endswith('__init__.py')
    else set(targets)
    for m, targets in graph.items()
  }


def test_the_graph_is_read():
  graph = _graph(top_level_only=True)
  assert 'ec2t_jax.training.parse' in graph['ec2t_jax.training.train']
  assert 'ec2t_jax.training.spec' in graph['ec2t_jax.training.parse']
  assert 'ec2t_jax.ternary' in graph['ec2t_jax.transforms']
  # A planted circle is found (guards the check itself).
  assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]


def test_no_import_circle():
  cycles = _cycles(_without_package_reexports(_graph(top_level_only=True)))
  assert not cycles, f'import circles: {cycles}'


def test_the_core_imports_no_training_stack_and_no_heavy_library():
  anywhere = _graph(top_level_only=False)
  for module in CORE:
    upward = sorted(
      t for t in anywhere[module] if t.startswith(('ec2t_jax.training', 'ec2t_jax.export'))
    )
    assert not upward, f'{module} imports {upward}'
    tree = ast.parse(open(MODULES[module]).read())
    heavy = [
      alias.name
      for stmt in tree.body
      if isinstance(stmt, (ast.Import, ast.ImportFrom))
      for alias in (stmt.names if isinstance(stmt, ast.Import) else [ast.alias(stmt.module or '')])
      if alias.name.split('.')[0] in HEAVY
    ]
    assert not heavy, f'{module} imports {heavy} at module level'


@pytest.mark.parametrize('lower', ['ec2t_jax.models', 'ec2t_jax.jaxprs', 'ec2t_jax.ternary'])
def test_lower_layers_never_import_the_training_program(lower):
  anywhere = _graph(top_level_only=False)
  for module, targets in anywhere.items():
    if module == lower or module.startswith(lower + '.'):
      upward = sorted(t for t in targets if t.startswith('ec2t_jax.training'))
      assert not upward, f'{module} imports {upward}'


def test_modules_stay_under_700_lines():
  catalogue = os.path.join(PACKAGE, 'models') + os.sep  # Model catalogues may be longer.
  long = {
    os.path.relpath(p, REPO): n
    for p in MODULES.values()
    if not p.startswith(catalogue) and (n := sum(1 for _ in open(p))) > MAX_LINES
  }
  assert not long, long
