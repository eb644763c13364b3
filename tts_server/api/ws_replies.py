"""The WebSocket's encoding of the core's typed events: one JSON object per event, ``status`` first.

The rule is the whole encoder: ``{"status": event.kind, **fields}``, where an
optional field (one whose default is ``None``) that is ``None`` is left out,
and a required one is sent even when it is ``null`` (``progress``'s
``sentences`` while the text is still being written).  Words become objects,
codes their strings.  The published reply schema (``schemas.json_schema``) is
generated from the same event classes by the same rule, so the two cannot drift.
"""

from __future__ import annotations

import dataclasses
import json
from enum import Enum
from functools import cache
from typing import Any

from ..core.events import Event


@cache
def _fields(kind: type[Event]) -> tuple[tuple[str, bool], ...]:
    """(name, left out when None) for each field of an event class, in declaration order."""
    return tuple((f.name, f.default is None) for f in dataclasses.fields(kind))


_COMPACT = json.JSONEncoder(separators=(",", ":"))  # made once: json.dumps with separators builds one per call
_SCALARS = (str, int, float, bool, type(None))  # as they are (most values: checked first, every bad frame's reply)


def _plain(value: Any) -> Any:
    if type(value) in _SCALARS:
        return value
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def as_json(event: Event) -> dict[str, Any]:
    """``event`` as the WebSocket's reply object."""
    reply: dict[str, Any] = {"status": event.kind.value}
    for name, optional in _fields(type(event)):
        value = getattr(event, name)
        if value is None and optional:
            continue
        reply[name] = _plain(value)
    return reply


def encode(event: Event) -> str:
    """``event`` as one text frame."""
    return _COMPACT.encode(as_json(event))
