"""No name in a test function shadows a module-level name of its file (pylint's redefined-outer-name, W0621).

A fixture requested by a test is a parameter of that test; if the fixture is defined in the same file
under the same name, the parameter hides the fixture function (and a local variable hides a helper or
an import the same way), so that reading the test one cannot tell which is meant. Fixtures are therefore
defined as ``@pytest.fixture(name="model") def model_fixture(...)``.

This is a plain reading of the syntax trees, so that it costs nothing and needs no linter. It is the
rule of ``pylint --disable=all --enable=W0621 tests`` (a minute and a half here), a little stricter: a
lambda's arguments count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
OWN_SCOPES = SCOPES + (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _children_in_scope(node: ast.AST):
    """The nodes of ``node``'s own scope: not those inside a nested function, class or comprehension."""
    for child in ast.iter_child_nodes(node):
        yield child
        if not isinstance(child, OWN_SCOPES):
            yield from _children_in_scope(child)


def _bound(nodes) -> set[str]:
    """The names these nodes (of one scope) bind."""
    names = set()
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {alias.asname or alias.name.split(".")[0] for alias in node.names if alias.name != "*"}
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def _arguments(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> set[str]:
    a = node.args
    return {arg.arg for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg] if arg is not None}


def shadowed_names(source: str) -> list[tuple[int, str, str]]:
    """(line, function, name) for each name a function of ``source`` binds that its module binds too."""
    tree = ast.parse(source)
    module = _bound(_children_in_scope(tree))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        declared = {name for n in _children_in_scope(node) if isinstance(n, (ast.Global, ast.Nonlocal)) for name in n.names}
        local = (_arguments(node) | _bound(_children_in_scope(node))) - declared
        name = getattr(node, "name", "<lambda>")
        found += [(node.lineno, name, shadowed) for shadowed in sorted(local & module)]
    return found


def test_the_check_sees_a_fixture_shadowed_by_a_parameter_and_a_local():
    source = ("import pytest\nimport torch\n\n@pytest.fixture\ndef model():\n    return 1\n\n"
              "def test_a(model):\n    torch = 2\n    return [x for x in range(model)]\n")
    assert shadowed_names(source) == [(8, "test_a", "model"), (8, "test_a", "torch")]
    renamed = source.replace("@pytest.fixture\ndef model():", '@pytest.fixture(name="model")\ndef model_fixture():')
    assert shadowed_names(renamed.replace("    torch = 2\n", "")) == []


@pytest.mark.parametrize("path", sorted(TESTS.glob("*.py")), ids=lambda p: p.name)
def test_no_test_file_shadows_its_own_names(path):
    shadowed = shadowed_names(path.read_text(encoding="utf-8"))
    assert not shadowed, (f"{path.name}: " + "; ".join(f"line {line}, {function}() rebinds {name!r}" for line, function, name in shadowed)
                          + " (define a fixture as @pytest.fixture(name=NAME) over def NAME_fixture, or rename the local)")
