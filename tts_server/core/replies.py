"""The replies the core posts for a job, and the stable error codes every interface shares.

A job's outbox holds these replies in the WebSocket's shapes (docs/protocol.md):
the WebSocket sends them as they are, the OpenAI and Wyoming adapters translate
them.  ``Refusal`` is a request refused with one of the codes; the
connection lives on.
"""

from __future__ import annotations

import json
from typing import Any

from ..engines.errors import ErrorCode, Refusal
from ..engines.request import SynthesisRequest

PROTOCOL_VERSION = 1
# The text clients of the original protocol know; ``detail`` says which engine, in our words.
LOADING_MESSAGE = "TTS model is still loading, request will be processed when ready"


# -- refusals shared by every interface ----------------------------------------------------------

def shutting_down(request_id: str | None = None) -> Refusal:
    return Refusal(ErrorCode.SHUTTING_DOWN, "The server is shutting down; connect again shortly", request_id)


def rate_limited(per_minute: int, request_id: str | None = None, who: str = "this connection") -> Refusal:
    return Refusal(ErrorCode.RATE_LIMITED, f"More than {per_minute} requests a minute on {who}; slow down",
                         request_id)


def too_many_queued(limit: int, request_id: str | None = None, who: str = "This connection") -> Refusal:
    return Refusal(ErrorCode.TOO_MANY_QUEUED, f"{who} already has {limit} requests waiting or running; "
                                                    "wait for one to finish", request_id)


# -- replies -------------------------------------------------------------------------------------

def error_reply(code: ErrorCode, message: str, request_id: str | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"status": "error", "code": ErrorCode(code).value, "message": message}
    if request_id is not None:
        reply["request_id"] = request_id
    return reply


def refusal_reply(exc: Refusal) -> dict[str, Any]:
    return error_reply(exc.code, exc.message, exc.request_id)


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
