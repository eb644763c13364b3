"""What every WebSocket message shares: the validation context, common field types, the base classes, and how
one broken rule becomes one ``invalid_request`` naming the field.  Pure: no sockets, no model."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from ..audio.text import speakable  # the rule every interface applies (re-exported)
from ..core.replies import ErrorCode, Refusal
from ..engines import registry
from ..engines.request import (DEFAULT_TEMPERATURE, DEFAULT_TOP_K, LANGUAGE_CODE, MAX_AUDIO_MS, MAX_SEED,
                               MAX_SPEAKER, MIN_AUDIO_MS)

MAX_REQUEST_ID_CHARS = 128
MAX_TEXT_FRAME = 256 * 1024  # bytes of one JSON text frame (binary frames may be larger: voice uploads)
MAX_TRANSCRIPT_CHARS = 2000
LANGUAGE_RULE = "a language code such as 'en', 'de' or 'en_US'"
LANGUAGE_PATTERN = f"^(?:{LANGUAGE_CODE.pattern})$"  # anchored: a schema's pattern matches anywhere otherwise


@dataclass(frozen=True)
class Limits:
    """Server-side bounds a request is validated against (the validation context)."""

    max_text_chars: int = 4000
    emotions: tuple[str, ...] = ()
    engines: tuple[str, ...] = field(default_factory=registry.names)  # what a request may name


def limits_of(info: ValidationInfo) -> Limits:
    return (info.context or {}).get("limits") or Limits()


RequestId = Annotated[str, Field(min_length=1, max_length=MAX_REQUEST_ID_CHARS,
                                 description=f"a string of 1 to {MAX_REQUEST_ID_CHARS} characters")]
Speaker = Annotated[int, Field(ge=0, le=MAX_SPEAKER, description=f"an integer from 0 to {MAX_SPEAKER}")]


def null_is_unset(data: Any) -> Any:
    """A field sent as ``null`` gets its default, as if it were left out (clients serialize unset options so)."""
    return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


SPEAKABLE_RULE = "a string with something to speak: at least one letter or digit (it is required)"


def non_empty(text: str) -> str:
    """A required text to speak, trimmed; blank, or nothing to speak, is a broken rule (the field's description
    says so: ``SPEAKABLE_RULE``)."""
    if not speakable(text):
        raise ValueError("nothing to speak")
    if not encodable(text):
        raise ValueError(ENCODABLE_RULE)
    return text.strip()


ENCODABLE_RULE = "valid Unicode: no lone surrogates (half of a UTF-16 pair, as JSON's \\ud800 escape can send)"


def encodable(text: str) -> bool:
    """Whether ``text`` is real Unicode: JSON lets a client escape half a surrogate pair, which Python reads into a
    string that no engine, tokenizer or caption file can encode (Piper failed with a traceback, an HTTP 500)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class SamplingFields(BaseModel):
    """CSM's sampling and the audio cap: the fields every message that speaks shares (synthesize, respond)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    seed: int | None = Field(None, ge=0, le=MAX_SEED, description=f"an integer from 0 to {MAX_SEED}")
    temperature: float = Field(DEFAULT_TEMPERATURE, gt=0.0, le=2.0, allow_inf_nan=False,
                               description="a number above 0 and at most 2")
    top_k: int = Field(DEFAULT_TOP_K, ge=1, le=1_000_000, description="an integer from 1 to 1000000")
    max_audio_length_ms: float | None = Field(None, ge=MIN_AUDIO_MS, le=MAX_AUDIO_MS, allow_inf_nan=False,
                                              description=f"a number at least {MIN_AUDIO_MS} and at most "
                                                          f"{MAX_AUDIO_MS}")


class MessageBase(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # unknown fields are ignored (newer clients)

    request_id: RequestId | None = None

    _nulls = model_validator(mode="before")(null_is_unset)


def speaker_digits(value: Any) -> Any:
    """``"3"`` as 3 (the original protocol's clients send strings); not ``"²"`` or ``"３"``, which ``isdigit``
    also accepts."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 12:
        return int(value)
    return value


MAX_JSON_DEPTH = 32  # our messages are flat; deeper nesting is refused before the parser recurses into it
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(r"[\[\]{}]")


def loads_shallow(raw: str | bytes) -> Any:
    """``json.loads`` for what a client sent, refusing nesting deeper than ``MAX_JSON_DEPTH`` (``ValueError``)
    first.  The parser recurses once per level: a frame of 100,000 brackets would take it to the interpreter's
    recursion limit, where any finalizer that happens to run (a socket's, a generator's) fails too."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else raw
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH:  # only then can it be too deep: look closer
        depth = 0
        for bracket in _BRACKET.findall(_JSON_STRING.sub('""', text)):
            depth += 1 if bracket in "[{" else -1
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return json.loads(raw)


def load_json_object(raw: str | bytes) -> dict[str, Any]:
    try:
        data = loads_shallow(raw)
    except (ValueError, RecursionError) as exc:
        raise Refusal(ErrorCode.INVALID_JSON, f"Message is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise Refusal(ErrorCode.INVALID_REQUEST, "Message must be a JSON object")
    return data


def validate(model: type[BaseModel], data: dict[str, Any], request_id: str | None = None,
             context: dict[str, Any] | None = None) -> Any:
    """``model`` from ``data``; a broken rule becomes ``invalid_request`` naming the field (its description)."""
    try:
        return model.model_validate(data, context=context)
    except Refusal as exc:
        exc.request_id = exc.request_id or request_id
        raise
    except ValidationError as exc:
        raise Refusal(ErrorCode.INVALID_REQUEST, field_message(model, exc), request_id) from None


def field_message(model: type[BaseModel], exc: ValidationError) -> str:
    """The first broken rule in words: the field's description, or a whole-message rule's own message."""
    error = exc.errors(include_url=False)[0]
    name = error["loc"][0] if error["loc"] else None
    field = model.model_fields.get(name) if isinstance(name, str) else None
    if field is not None and field.description:
        return f"'{name}' must be {field.description}"
    if error["type"] == "value_error":
        return str(error["ctx"]["error"])
    return f"Invalid message: {error['msg']}"

