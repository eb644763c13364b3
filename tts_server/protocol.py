"""Protocol v1: parse and validate client messages, build server replies.

Pure functions and dataclasses only -- no sockets, no model -- so every rule of
the wire format lives here and is testable on its own.  ``docs/protocol.md``
is the prose version of this module.

Text frames carry JSON objects; audio travels in binary frames.  Every error
reply has a stable ``code`` (the ``ErrorCode`` values); clients branch on the
code, humans read the ``message``.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any

PROTOCOL_VERSION = 1
FORMATS = ("wav", "pcm", "flac", "ogg")
STREAM_FORMATS = ("pcm", "wav")
MAX_AUDIO_MS = 90_000
MIN_AUDIO_MS = 80  # one CSM frame
MAX_SPEAKER = 1_000_000
MAX_REQUEST_ID_CHARS = 128
MAX_TEXT_FRAME = 256 * 1024  # bytes of one JSON text frame (binary frames may be larger: voice uploads)
MAX_TRANSCRIPT_CHARS = 2000
DEFAULT_TEMPERATURE = 0.9
DEFAULT_TOP_K = 50
ENGINES = ("csm", "piper", "remote")  # the engines a chain may hold (--engines) and a request may name
LANGUAGE_CODE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8}){0,2}")


class ErrorCode(str, Enum):
    INVALID_JSON = "invalid_json"
    INVALID_REQUEST = "invalid_request"
    TEXT_TOO_LONG = "text_too_long"
    UNKNOWN_EMOTION = "unknown_emotion"
    UNKNOWN_REQUEST = "unknown_request"
    INVALID_VOICE = "invalid_voice"
    BUSY = "busy"
    CLIENT_TOO_SLOW = "client_too_slow"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_QUEUED = "too_many_queued"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    SHUTTING_DOWN = "shutting_down"
    GENERATION_TIMEOUT = "generation_timeout"
    UNSUPPORTED_LANGUAGE = "unsupported_language"
    MODEL_UNAVAILABLE = "model_unavailable"
    GENERATION_FAILED = "generation_failed"
    INTERNAL_ERROR = "internal_error"


class ProtocolError(Exception):
    """A message the server must answer with an error reply (the connection lives on)."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def reply(self) -> dict[str, Any]:
        return error_reply(self.code, self.message, self.request_id)


@dataclass(frozen=True)
class Limits:
    """Server-side bounds a request is validated against."""

    max_text_chars: int = 4000
    emotions: tuple[str, ...] = ()
    engines: tuple[str, ...] = ENGINES


@dataclass(frozen=True)
class SynthesisRequest:
    """A validated ``synthesize`` request; field names and defaults are the wire's."""

    text: str
    request_id: str
    speaker: int = 0
    seed: int | None = None
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    max_audio_length_ms: float | None = None
    format: str = "wav"
    stream: bool = False
    context: bool = True
    emotion: str | None = None
    engine: str | None = None
    speed: float = 1.0  # speaking rate (the HTTP API's ``speed``; Piper honours it, CSM refuses anything but 1)
    language: str | None = None  # ISO 639 code, optionally with a region ("de", "en_US", "pt-BR"): picks the engine


@dataclass(frozen=True)
class CancelRequest:
    request_id: str


@dataclass(frozen=True)
class ResetRequest:
    pass


@dataclass(frozen=True)
class VoiceRequest:
    """Set (followed by one binary frame holding the audio file) or clear a speaker's voice prompt."""

    speaker: int
    text: str | None = None
    clear: bool = False


Message = SynthesisRequest | CancelRequest | ResetRequest | VoiceRequest


@dataclass
class Fields:
    """Reads typed fields out of a JSON object, raising ``invalid_request`` with the field's name."""

    data: dict[str, Any]
    request_id: str | None = None

    def fail(self, message: str, code: ErrorCode = ErrorCode.INVALID_REQUEST) -> ProtocolError:
        return ProtocolError(code, message, self.request_id)

    def integer(self, name: str, default: int | None, low: int, high: int) -> int | None:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, str) and name == "speaker" and value.isascii() and value.isdigit():
            value = int(value)  # "3" as 3; not "²" or "３", which str.isdigit also accepts
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(f"'{name}' must be an integer from {low} to {high}")
        return value

    def number(self, name: str, default: float | None, low: float, high: float,
               low_open: bool = False) -> float | None:
        value = self.data.get(name)
        if value is None:
            return default
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok:
            ok = (value > low if low_open else value >= low) and value <= high
        if not ok:
            bound = "above" if low_open else "at least"
            raise self.fail(f"'{name}' must be a number {bound} {low:g} and at most {high:g}")
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.data.get(name, default)
        if not isinstance(value, bool):
            raise self.fail(f"'{name}' must be true or false")
        return value

    def language(self, name: str = "language") -> str | None:
        """An ISO 639 language code with an optional region, as ``en``, ``en_US`` or ``pt-BR``."""
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or not LANGUAGE_CODE.fullmatch(value):
            raise self.fail(f"'{name}' must be a language code such as 'en', 'de' or 'en_US'")
        return value

    def choice(self, name: str, default: str | None, choices: tuple[str, ...]) -> str | None:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, str) or value not in choices:
            raise self.fail(f"'{name}' must be one of: {', '.join(choices)}")
        return value


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def parse_message(raw: str | bytes, limits: Limits) -> Message:
    """Turn one WebSocket frame into a validated message, or raise ``ProtocolError``."""
    if isinstance(raw, bytes):
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST, "Binary frames are only accepted after a voice message; "
            "send requests as JSON text frames")
    size = len(raw) if len(raw) * 4 <= MAX_TEXT_FRAME else len(raw.encode("utf-8", "surrogatepass"))
    if size > MAX_TEXT_FRAME:
        raise ProtocolError(ErrorCode.INVALID_REQUEST,
                            f"Text frames are limited to {MAX_TEXT_FRAME // 1024} KiB; this one has {size} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(ErrorCode.INVALID_JSON, f"Message is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "Message must be a JSON object")
    request_id = data.get("request_id")
    if request_id is not None and (not isinstance(request_id, str) or not 0 < len(request_id)
                                   <= MAX_REQUEST_ID_CHARS):
        raise ProtocolError(ErrorCode.INVALID_REQUEST,
                            f"'request_id' must be a string of 1 to {MAX_REQUEST_ID_CHARS} characters")
    kind = data.get("type", "synthesize")
    if kind == "synthesize":
        return _parse_synthesis(Fields(data, request_id), limits)
    if kind == "cancel":
        if request_id is None:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, "'cancel' needs the 'request_id' to cancel")
        return CancelRequest(request_id)
    if kind == "reset":
        return ResetRequest()
    if kind == "voice":
        return _parse_voice(Fields(data, request_id))
    raise ProtocolError(ErrorCode.INVALID_REQUEST,
                        "'type' must be one of: synthesize, cancel, reset, voice", request_id)


def _parse_voice(f: Fields) -> VoiceRequest:
    speaker = f.integer("speaker", None, 0, MAX_SPEAKER)
    if speaker is None:
        raise f.fail("'voice' needs the 'speaker' whose voice it sets")
    if f.boolean("clear", False):
        return VoiceRequest(speaker=speaker, clear=True)
    text = f.data.get("text")
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TRANSCRIPT_CHARS:
        raise f.fail(f"'voice' needs 'text': the exact transcript of the clip (1 to {MAX_TRANSCRIPT_CHARS} "
                     "characters); then send the audio file as one binary frame")
    return VoiceRequest(speaker=speaker, text=text.strip())


def _parse_synthesis(f: Fields, limits: Limits) -> SynthesisRequest:
    text = f.data.get("text")
    if not isinstance(text, str) or not text.strip():
        raise f.fail("'text' is required and must be a non-empty string")
    text = text.strip()
    if len(text) > limits.max_text_chars:
        raise f.fail(f"'text' has {len(text)} characters; the limit is {limits.max_text_chars}",
                     ErrorCode.TEXT_TOO_LONG)
    stream = f.boolean("stream", False)
    fmt = f.choice("format", "pcm" if stream else "wav", FORMATS)
    if stream and fmt not in STREAM_FORMATS:
        raise f.fail(f"'format' {fmt!r} cannot be streamed; use one of: {', '.join(STREAM_FORMATS)}")
    emotion = f.data.get("emotion")
    if emotion is not None:
        if not isinstance(emotion, str):
            raise f.fail("'emotion' must be a string")
        if emotion not in limits.emotions:
            known = ", ".join(limits.emotions) or "none are configured"
            raise f.fail(f"Unknown emotion {emotion!r}; available: {known}", ErrorCode.UNKNOWN_EMOTION)
    return SynthesisRequest(
        text=text,
        request_id=f.request_id or new_request_id(),
        speaker=f.integer("speaker", 0, 0, MAX_SPEAKER),
        seed=f.integer("seed", None, 0, 2**63 - 1),
        temperature=f.number("temperature", DEFAULT_TEMPERATURE, 0.0, 2.0, low_open=True),
        top_k=f.integer("top_k", DEFAULT_TOP_K, 1, 1_000_000),
        max_audio_length_ms=f.number("max_audio_length_ms", None, MIN_AUDIO_MS, MAX_AUDIO_MS),
        format=fmt,
        stream=stream,
        context=f.boolean("context", True),
        emotion=emotion,
        engine=f.choice("engine", None, limits.engines),
        language=f.language(),
    )


# -- refusals shared by the connection-oriented interfaces (WebSocket, Wyoming) ---

def shutting_down(request_id: str | None = None) -> ProtocolError:
    return ProtocolError(ErrorCode.SHUTTING_DOWN, "The server is shutting down; connect again shortly", request_id)


def rate_limited(per_minute: int, request_id: str | None = None) -> ProtocolError:
    return ProtocolError(ErrorCode.RATE_LIMITED,
                         f"More than {per_minute} requests a minute on this connection; slow down", request_id)


def too_many_queued(limit: int, request_id: str | None = None) -> ProtocolError:
    return ProtocolError(ErrorCode.TOO_MANY_QUEUED, f"This connection already has {limit} requests waiting or "
                                                    "running; wait for one to finish", request_id)


# -- replies --------------------------------------------------------------------

def error_reply(code: ErrorCode, message: str, request_id: str | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"status": "error", "code": ErrorCode(code).value, "message": message}
    if request_id is not None:
        reply["request_id"] = request_id
    return reply


# The text clients of the original protocol know; ``detail`` says which engine, in our words.
LOADING_MESSAGE = "TTS model is still loading, request will be processed when ready"


def loading_reply(detail: str, request_id: str | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"status": "loading", "message": LOADING_MESSAGE, "detail": detail}
    if request_id is not None:
        reply["request_id"] = request_id
    return reply


def success_reply(request: SynthesisRequest, *, sample_rate: int, length_bytes: int,
                  duration_s: float, engine: str, **extra: Any) -> dict[str, Any]:
    """Metadata sent before (or, when streaming, after) the audio bytes."""
    reply = {
        "status": "success",
        "message": "Audio generated successfully",
        "format": request.format,
        "sample_rate": sample_rate,
        "length_bytes": length_bytes,
        "request_id": request.request_id,
        "duration_s": round(duration_s, 4),
        "engine": engine,
        "channels": 1,
        "speaker": request.speaker,
    }
    reply.update(extra)
    return reply


def start_reply(request: SynthesisRequest, *, sample_rate: int, engine: str, **extra: Any) -> dict[str, Any]:
    reply = {
        "status": "start", "request_id": request.request_id, "format": request.format,
        "sample_rate": sample_rate, "channels": 1, "sample_width": 2, "engine": engine,
    }
    reply.update(extra)
    return reply


def cancelled_reply(request_id: str) -> dict[str, Any]:
    return {"status": "cancelled", "request_id": request_id}


def encode(reply: dict[str, Any]) -> str:
    return json.dumps(reply, separators=(",", ":"))
