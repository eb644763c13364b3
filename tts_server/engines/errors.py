"""The one refusal type every layer raises, and the stable error codes clients read.

A ``Refusal`` is a request the server answers with an error and lives on; it
carries an ``ErrorCode`` and a sentence for people.  It lives here, in the
lowest layer that refuses (an engine that cannot reach its remote, a text too
long for a model), so that the core and every interface above share it.  Each
interface maps a refusal to its wire once: the WebSocket to an ``error`` reply,
HTTP to a status and OpenAI's error body, Wyoming to an ``error`` event.
"""

from __future__ import annotations

from enum import Enum


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
    TEXT_TIMEOUT = "text_timeout"  # a streamed text that completed no sentence and did not end in time
    UNSUPPORTED_LANGUAGE = "unsupported_language"
    UNKNOWN_SESSION = "unknown_session"
    TOO_MANY_SESSIONS = "too_many_sessions"
    STORE_UNAVAILABLE = "store_unavailable"
    MODEL_UNAVAILABLE = "model_unavailable"
    GENERATION_FAILED = "generation_failed"
    INTERNAL_ERROR = "internal_error"
    # HTTP's own (OpenAI's names): an unknown model or voice, a body over the limit, a missing key, a cancel;
    # an unknown path or a method a path does not take
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    MODEL_NOT_FOUND = "model_not_found"
    VOICE_NOT_FOUND = "voice_not_found"
    REQUEST_TOO_LARGE = "request_too_large"
    INVALID_API_KEY = "invalid_api_key"
    CANCELLED = "cancelled"


# The engine's own failures: a later engine of the chain may answer the request instead.
ENGINE_FAULTS = frozenset({ErrorCode.GENERATION_FAILED, ErrorCode.MODEL_UNAVAILABLE, ErrorCode.BUSY})


class Refusal(Exception):
    """A request the server refuses or fails, with its stable ``code``; the connection and the server live on.

    ``request_id`` names the request it answers (when the client gave one);
    ``param`` the field at fault, for interfaces that report it (OpenAI's body).
    """

    def __init__(self, code: ErrorCode | str, message: str, request_id: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.request_id = request_id
        self.param = param

    def answering(self, request_id: str | None) -> "Refusal":
        """The same refusal, answering ``request_id`` (a store's refusal, raised for the request that met it)."""
        return Refusal(self.code, self.message, request_id, self.param)

    @property
    def engine_fault(self) -> bool:
        """The engine failed (not the request): the next engine of the chain may answer instead."""
        return self.code in ENGINE_FAULTS


class EngineError(Refusal):
    """An engine's failure on one request (raised on its worker thread)."""


class Busy(Refusal):
    """The queue is full."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(ErrorCode.BUSY, message, request_id)


class ClientTooSlow(Refusal):
    """A streamed reply's client left too much audio unread."""

    def __init__(self, seconds: float) -> None:
        super().__init__(ErrorCode.CLIENT_TOO_SLOW, f"The client left more than {seconds:g} s of streamed audio "
                                                    "unread; the stream was stopped")
