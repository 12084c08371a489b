"""Every public class and function in `urm_jax/` and `convert/` has a docstring.

Read with `ast` (nothing is imported). Public: a module-level function or class whose name does not
start with `_`, and a method (properties included) or nested class of a public class whose name does
not start with `_`, plus `__call__` (a module's forward pass is its public interface). Functions
nested in functions are not checked; neither are `@overload` stubs.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("urm_jax", "convert")
PUBLIC_DUNDERS = {"__call__"}


def _is_public(name: str) -> bool:
    return not name.startswith("_") or name in PUBLIC_DUNDERS


def _is_overload(node: ast.AST) -> bool:
    for decorator in getattr(node, "decorator_list", ()):
        target = decorator.attr if isinstance(decorator, ast.Attribute) else getattr(decorator, "id", "")
        if target == "overload":
            return True
    return False


def _body_defs(body: list[ast.stmt]):
    """The defs of a block, looking through `if`/`try`/`with` (e.g. `if TYPE_CHECKING:`)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in ("body", "orelse", "finalbody"):
                yield from _body_defs(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                yield from _body_defs(handler.body)


def _missing_in(body: list[ast.stmt], prefix: str, path: str):
    for node in _body_defs(body):
        if not _is_public(node.name) or _is_overload(node):
            continue
        qualname = f"{prefix}{node.name}"
        if ast.get_docstring(node) is None:
            yield f"{path}:{node.lineno} {qualname}"
        if isinstance(node, ast.ClassDef):
            yield from _missing_in(node.body, f"{qualname}.", path)


def missing_docstrings() -> list[str]:
    """`path:line qualname` of every public class or function without a docstring."""
    found = []
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(file.read_text(), filename=str(file))
            found.extend(_missing_in(tree.body, "", str(file.relative_to(ROOT))))
    return found


def test_public_api_has_docstrings():
    missing = missing_docstrings()
    assert not missing, f"{len(missing)} public classes/functions lack a docstring:\n" + "\n".join(missing)


def test_checker_finds_a_missing_docstring():
    source = (
        "def f():\n    pass\n"
        "def _private():\n    pass\n"
        "class C:\n    '''Doc.'''\n    @property\n    def p(self):\n        return 1\n"
        "    def __call__(self):\n        def inner():\n            pass\n"
        "    def __init__(self):\n        pass\n"
    )
    found = list(_missing_in(ast.parse(source).body, "", "x.py"))
    assert found == ["x.py:1 f", "x.py:8 C.p", "x.py:10 C.__call__"]


if __name__ == "__main__":  # count per package: python tests/test_docstrings.py
    counts = Counter(entry.split(":")[0].rsplit("/", 1)[0] for entry in missing_docstrings())
    for package, count in sorted(counts.items()):
        print(f"{count:4d}  {package}")
    print(f"{sum(counts.values()):4d}  total")
