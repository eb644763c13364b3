"""The server's replies as pydantic models, generated from the core's event classes for the published JSON Schema.

The WebSocket's encoder (``ws_replies``) writes an event as ``{"status": kind, **fields}``, leaving out an
optional field (default ``None``) that is ``None`` and sending every other field, even a ``null`` one.  The
models here say exactly that, class by class: ``status`` is the event's kind; a field whose default is ``None``
may be absent but is never ``null``; every other field is required, and ``null`` only where its type allows it
(``progress``'s ``sentences``).  Unknown properties are forbidden (``additionalProperties: false``).  So the
schema cannot drift from what the server sends: a field added to an event is in the schema at once, and a reply
built outside the events fails the tests that validate every reply against it (tests/conftest.py).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..core.events import REPLIES, Event

STRICT = ConfigDict(extra="forbid")


def model_name(kind: type[Event]) -> str:
    """``SuccessReply``, ``VoiceSavedReply``, ...: the kind in CamelCase (the schema's ``$defs`` names)."""
    return "".join(part.title() for part in kind.kind.value.split("_")) + "Reply"


def reply_model(kind: type[Event]) -> type[BaseModel]:
    """One event class as the model of its WebSocket reply."""
    fields: dict[str, Any] = {"status": (Literal[kind.kind.value], ...)}
    fields.update(_fields(kind))
    return create_model(model_name(kind), __config__=STRICT, __doc__=_doc(kind), **fields)


@cache
def _nested(cls: type) -> type[BaseModel]:
    """A dataclass inside an event (``Word``) as a strict model of its own (one ``$defs`` entry)."""
    return create_model(cls.__name__, __config__=STRICT, __doc__=_doc(cls), **_fields(cls))


def _fields(cls: type) -> dict[str, tuple[Any, Any]]:
    """pydantic field definitions by the encoder's rule: default ``None`` = may be absent, never ``null``."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, tuple[Any, Any]] = {}
    for field in dataclasses.fields(cls):
        annotation = _as_model(hints[field.name])
        if field.default is None:  # (the schema shows no ``default: null``: the value is never null)
            fields[field.name] = (_without_none(annotation), Field(None, json_schema_extra=_no_default))
        else:  # no default, or one that is not None: always sent
            fields[field.name] = (annotation, ...)
    return fields


def _as_model(annotation: Any) -> Any:
    """``annotation`` with each dataclass in it (``tuple[Word, ...] | None``) replaced by its strict model."""
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return _nested(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return Union[tuple(_as_model(arg) for arg in args)]
    if origin is tuple:
        return tuple[tuple(arg if arg is Ellipsis else _as_model(arg) for arg in args)]
    return annotation


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        rest = tuple(arg for arg in typing.get_args(annotation) if arg is not type(None))
        return Union[rest] if len(rest) > 1 else rest[0]
    return annotation


def _doc(cls: type) -> str | None:
    """The class's own docstring; not the signature ``dataclass`` writes for a class without one."""
    doc = cls.__doc__
    return None if doc is None or doc.startswith(f"{cls.__name__}(") else doc


REPLY_MODELS: tuple[type[BaseModel], ...] = tuple(reply_model(kind) for kind in REPLIES)
# One reply of the server: the ``status`` names which (a discriminator for clients' code generators).
Reply = Annotated[Union[REPLY_MODELS], Field(discriminator="status")]
