"""The core speaks to the interfaces in typed events (``core/events.py``), never in JSON: no adapter parses what the
core wrote.  Each interface encodes the events in its own wire format; the only JSON an adapter reads is a client's,
through ``schema_rules.loads_shallow`` (which also refuses nesting past its limit)."""

from __future__ import annotations

import ast
from pathlib import Path

import tts_server.api

API = Path(tts_server.api.__file__).parent
# The one module that parses JSON a client sent: ``loads_shallow``, which every client-facing parser goes through.
CLIENT_INPUT = {"schema_rules.py"}


def _json_loads_calls(path: Path) -> list[int]:
    """Lines of ``path`` that call ``json.loads`` (or ``loads`` imported from ``json``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    from_json = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 and node.module == "json" for alias in node.names if alias.name == "loads"}
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "loads" and isinstance(func.value, ast.Name) \
                and func.value.id == "json":
            lines.append(node.lineno)
        elif isinstance(func, ast.Name) and func.id in from_json:
            lines.append(node.lineno)
    return lines


def test_no_interface_module_parses_json_but_the_client_input_parser():
    found = {f"{path.name}:{line}" for path in sorted(API.glob("*.py")) if path.name not in CLIENT_INPUT
             for line in _json_loads_calls(path)}
    assert not found, f"json.loads outside the client-input parser (read the core's typed events instead): {found}"


def test_the_client_input_parser_is_still_where_json_is_read():
    """The allowance above is not stale: ``schema_rules`` is where client JSON is parsed."""
    assert _json_loads_calls(API / "schema_rules.py")
