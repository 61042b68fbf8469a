"""The package's shape: no import cycle anywhere (module-level or deferred imports alike), each layer imports
only the layers below it (core < io < training < lens < command-line entry points), and ``import gqa_core``
loads the core only."""
import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'gqa_core'
LAYERS = ('core', 'io', 'training', 'lens')


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def modules() -> Dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob('*.py')}


def imports_of(name: str, path: Path, known: Set[str]) -> Set[str]:
    """Every gqa_core module ``path`` imports, wherever the import statement sits (functions included)."""
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')
                base = base[:len(base) - node.level + 1]
                stem = '.'.join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ''
            targets = [f'{stem}.{alias.name}' if f'{stem}.{alias.name}' in known else stem for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def graph() -> Dict[str, Set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def layer_of(name: str) -> int:
    parts = name.split('.')
    if len(parts) == 1:
        return 0  # gqa_core/__init__: the core's public names (checked below)
    if parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return len(LAYERS)  # python -m gqa_core.train etc.: entry points


def find_cycle(edges: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_the_walker_sees_deferred_and_relative_imports():
    edges = graph()
    assert 'gqa_core.core.policies' in edges['gqa_core.core.attention']
    assert 'gqa_core.io.hub' in edges['gqa_core'], 'the lazy import inside __getattr__ is seen'
    assert 'gqa_core.lens.figures' in edges['gqa_core.lens.views'], '"from . import figures" is seen'


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert not cycle, ' -> '.join(cycle)


def test_a_cycle_is_found():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']


@pytest.mark.parametrize('name', sorted(modules()))
def test_no_lower_layer_imports_a_higher_one(name):
    edges = graph()
    allowed = {'gqa_core.io.hub'} if name == 'gqa_core' else set()  # the lazy hub functions
    upward = sorted(t for t in edges[name] - allowed if layer_of(t) > layer_of(name))
    assert not upward, f'{name} (layer {layer_of(name)}) imports {upward}'


def test_import_gqa_core_loads_the_core_only():
    code = ('import sys, gqa_core; print(",".join(sorted(m for m in sys.modules if m.startswith("gqa_core"))));'
            'print(",".join(m for m in ("gradio", "plotly", "accelerate", "datasets") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.splitlines()
    loaded = out[0].split(',')
    assert all(m == 'gqa_core' or m.startswith('gqa_core.core') for m in loaded), loaded
    assert out[1:] in ([''], []), f'import gqa_core loaded {out[1]}'
