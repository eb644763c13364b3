"""The package stays readable a piece at a time: no function longer than a screen, no class with more methods than a
reader keeps in mind, no module longer than one sitting.  A piece that outgrows these limits has more than one job;
it is split by what it does (``core/endings.py`` out of the scheduler, ``generation._Run`` out of ``generate``), not
by cutting it at an arbitrary line."""

from __future__ import annotations

import ast
from pathlib import Path

import tts_server

PACKAGE = Path(tts_server.__file__).parent
ROOT = PACKAGE.parent
MAX_FUNCTION_LINES = 60  # decorators and docstring included: what a reader has to hold at once
MAX_CLASS_METHODS = 20  # defined in the class's own body (inherited ones are read elsewhere)
MAX_MODULE_LINES = 400


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}"


def long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{_where(path, node.lineno)} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def crowded_classes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            methods = sum(isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) for item in node.body)
            if methods > MAX_CLASS_METHODS:
                found.append(f"{_where(path, node.lineno)} {node.name} ({methods} methods)")
    return found


def test_no_function_is_longer_than_a_screen():
    found = [hit for path in _modules() for hit in long_functions(path)]
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines (split them into steps):\n" + "\n".join(found)


def test_no_class_has_more_methods_than_a_reader_keeps_in_mind():
    found = [hit for path in _modules() for hit in crowded_classes(path)]
    assert not found, f"classes over {MAX_CLASS_METHODS} methods (split them by concern):\n" + "\n".join(found)


def test_no_module_is_longer_than_one_sitting():
    found = [f"{_where(path, 1)} ({lines} lines)" for path in _modules()
             if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    assert not found, f"modules over {MAX_MODULE_LINES} lines (split them by concern):\n" + "\n".join(found)


def test_the_checks_see_what_they_measure(tmp_path):
    """The walk counts nested and async functions and a class's own methods; a guard that saw nothing would pass."""
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    methods = "\n".join(f"    def m{i}(self): pass" for i in range(21))
    sample = tmp_path / "sample.py"
    sample.write_text(f"def outer():\n    async def inner():\n{body.replace('    ', '        ')}\n"
                      f"class Wide:\n{methods}\n", encoding="utf-8")
    assert [hit.split(" ")[1] for hit in long_functions(sample)] == ["outer", "inner"]
    assert [hit.split(" ")[1] for hit in crowded_classes(sample)] == ["Wide"]
    assert len(_modules()) > 50

