"""The product package's shape: every module listed in the README's table, with a docstring, and small.

A maintainer finds a module by the README's table and learns what it owns
from its docstring, so both must name every module; a module past
``MAX_LINES`` holds more than one thing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: The longest a module of the product or development package may be, in lines.
MAX_LINES = 400


def modules(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).glob("*.py") if p.name != "__init__.py")


def readme_table() -> set[str]:
    text = (REPO / "README.md").read_text()
    table = text[text.index("<!-- modules:start -->") : text.index("<!-- modules:end -->")]
    return set(re.findall(r"^\| `([a-z_]+\.py)` \|", table, flags=re.MULTILINE))


def test_the_readme_lists_every_module_of_worker_and_no_other() -> None:
    assert readme_table() == {p.name for p in modules("worker")}


@pytest.mark.parametrize("path", [*modules("worker"), *modules("devstack")], ids=lambda p: str(p.relative_to(REPO)))
def test_each_module_says_what_it_owns_and_stays_small(path: Path) -> None:
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert docstring, f"{path.name} has no docstring"
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name}: {lines} lines"
