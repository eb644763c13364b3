"""The replies the core posts for a job, and the stable error codes every interface shares.

A job's outbox holds these replies in the WebSocket's shapes (docs/protocol.md):
the WebSocket sends them as they are, the OpenAI and Wyoming adapters translate
them.  ``ProtocolError`` is a request refused with one of the codes; the
connection lives on.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

from ..engines.request import SynthesisRequest

PROTOCOL_VERSION = 1
# The text clients of the original protocol know; ``detail`` says which engine, in our words.
LOADING_MESSAGE = "TTS model is still loading, request will be processed when ready"


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
    UNKNOWN_SESSION = "unknown_session"
    TOO_MANY_SESSIONS = "too_many_sessions"
    STORE_UNAVAILABLE = "store_unavailable"
    MODEL_UNAVAILABLE = "model_unavailable"
    GENERATION_FAILED = "generation_failed"
    INTERNAL_ERROR = "internal_error"


class ProtocolError(Exception):
    """A message the server must answer with an error reply (the connection lives on)."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.request_id = request_id

    def reply(self) -> dict[str, Any]:
        return error_reply(self.code, self.message, self.request_id)


# -- refusals shared by every interface ----------------------------------------------------------

def shutting_down(request_id: str | None = None) -> ProtocolError:
    return ProtocolError(ErrorCode.SHUTTING_DOWN, "The server is shutting down; connect again shortly", request_id)


def rate_limited(per_minute: int, request_id: str | None = None, who: str = "this connection") -> ProtocolError:
    return ProtocolError(ErrorCode.RATE_LIMITED, f"More than {per_minute} requests a minute on {who}; slow down",
                         request_id)


def too_many_queued(limit: int, request_id: str | None = None, who: str = "This connection") -> ProtocolError:
    return ProtocolError(ErrorCode.TOO_MANY_QUEUED, f"{who} already has {limit} requests waiting or running; "
                                                    "wait for one to finish", request_id)


# -- replies -------------------------------------------------------------------------------------

def error_reply(code: ErrorCode, message: str, request_id: str | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"status": "error", "code": ErrorCode(code).value, "message": message}
    if request_id is not None:
        reply["request_id"] = request_id
    return reply


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
