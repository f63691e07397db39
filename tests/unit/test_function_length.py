"""Every function of the recipes fits on a screen: at most 60 lines, `def` line through the
last line of its body (docstring, nested functions and methods included)."""

from __future__ import annotations

import ast
from pathlib import Path

import moepost.recipes

MAX_LINES = 60
RECIPES = Path(moepost.recipes.__file__).parent


def long_functions(path: Path, limit: int = MAX_LINES) -> list[tuple[str, str, int]]:
    """(file name, function name, lines) of every function in `path` longer than `limit`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            if lines > limit:
                out.append((path.name, node.name, lines))
    return out


def _body(n: int, indent: str) -> str:
    return "".join(f"{indent}x{i} = {i}\n" for i in range(n))


def test_long_functions_are_found(tmp_path: Path) -> None:
    """60 lines pass; 61 fail, methods and nested functions included."""
    source = (
        "def at_limit():\n" + _body(59, "    ")
        + "class C:\n    def method(self):\n" + _body(60, "        ")
        + "def outer():\n    def inner():\n" + _body(59, "        ") + "    return inner\n"
    )  # fmt: skip
    (tmp_path / "m.py").write_text(source)
    found = {name: lines for _, name, lines in long_functions(tmp_path / "m.py")}
    assert found == {"method": 61, "outer": 62}
    assert long_functions(tmp_path / "m.py", limit=61) == [("m.py", "outer", 62)]


def test_recipe_functions_fit_on_a_screen() -> None:
    offenders = [
        f"{name}::{func} ({lines} lines)"
        for path in sorted(RECIPES.glob("*.py"))
        for name, func, lines in long_functions(path)
    ]
    assert not offenders, f"functions over {MAX_LINES} lines: " + ", ".join(offenders)
