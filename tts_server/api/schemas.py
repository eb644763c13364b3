"""Protocol v1 of the WebSocket as pydantic models: one source for field types, ranges, defaults and the JSON Schema.

Text frames carry JSON objects; audio travels in binary frames.  ``parse_message``
turns one frame into a validated message or raises ``ProtocolError`` with a
stable code and a message naming the field (``'speaker' must be an integer from
0 to 1000000``): the message is the field's ``description``, so the rule a
client reads is the rule that is checked.  Rules that depend on the server
(text length, emotions, engines) read a ``Limits`` passed as validation context.
``json_schema()`` publishes the client messages and the server's replies
(``GET /v1/websocket.schema.json``; docs/protocol.md).  Pure: no sockets, no model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ..core.replies import PROTOCOL_VERSION, ErrorCode, ProtocolError
from ..engines.request import (DEFAULT_TEMPERATURE, DEFAULT_TOP_K, ENGINES, FORMATS, LANGUAGE_CODE, MAX_AUDIO_MS,
                               MAX_SEED, MAX_SPEAKER, MIN_AUDIO_MS, STREAM_FORMATS, SynthesisRequest, new_request_id)

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
    engines: tuple[str, ...] = ENGINES


def _limits(info: ValidationInfo) -> Limits:
    return (info.context or {}).get("limits") or Limits()


RequestId = Annotated[str, Field(min_length=1, max_length=MAX_REQUEST_ID_CHARS,
                                 description=f"a string of 1 to {MAX_REQUEST_ID_CHARS} characters")]
Speaker = Annotated[int, Field(ge=0, le=MAX_SPEAKER, description=f"an integer from 0 to {MAX_SPEAKER}")]


def null_is_unset(data: Any) -> Any:
    """A field sent as ``null`` gets its default, as if it were left out (clients serialize unset options so)."""
    return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


def non_empty(text: str) -> str:
    """A required text, trimmed; blank is a broken rule (the field's description says so)."""
    if not text.strip():
        raise ValueError("empty")
    return text.strip()


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # unknown fields are ignored (newer clients)

    request_id: RequestId | None = None

    _nulls = model_validator(mode="before")(null_is_unset)


def _speaker_digits(value: Any) -> Any:
    """``"3"`` as 3 (the original protocol's clients send strings); not ``"²"`` or ``"３"``, which ``isdigit``
    also accepts."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 12:
        return int(value)
    return value


class SynthesizeMessage(_Message):
    """Speak ``text``; the reply is ``success`` + one binary frame, or ``start``, binary chunks and ``success``."""

    type: Literal["synthesize"] = "synthesize"
    text: str = Field(description="a non-empty string (it is required)")
    speaker: Speaker = 0
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description=f"an integer from 0 to {MAX_SEED}")
    temperature: float = Field(DEFAULT_TEMPERATURE, gt=0.0, le=2.0, allow_inf_nan=False,
                               description="a number above 0 and at most 2")
    top_k: int = Field(DEFAULT_TOP_K, ge=1, le=1_000_000, description="an integer from 1 to 1000000")
    max_audio_length_ms: float | None = Field(None, ge=MIN_AUDIO_MS, le=MAX_AUDIO_MS, allow_inf_nan=False,
                                              description=f"a number at least {MIN_AUDIO_MS} and at most "
                                                          f"{MAX_AUDIO_MS}")
    format: Literal[FORMATS] | None = Field(None, description=f"one of: {', '.join(FORMATS)} (streams: "
                                                              f"{', '.join(STREAM_FORMATS)}; default wav, or pcm "
                                                              "when streaming)")
    stream: bool = Field(False, description="true or false")
    context: bool = Field(True, description="true or false")
    emotion: str | None = Field(None, description="the name of a configured emotion (see /v1/info)")
    engine: Literal[ENGINES] | None = Field(None, description=f"one of: {', '.join(ENGINES)}")
    language: str | None = Field(None, pattern=LANGUAGE_PATTERN, description=LANGUAGE_RULE)

    _speaker = field_validator("speaker", mode="before")(_speaker_digits)

    _text = field_validator("text")(non_empty)

    @field_validator("engine")
    @classmethod
    def _engine(cls, engine: str | None, info: ValidationInfo) -> str | None:
        if engine is not None and engine not in _limits(info).engines:
            raise ValueError("not an engine of this server")
        return engine

    @model_validator(mode="after")
    def _server_rules(self, info: ValidationInfo) -> "SynthesizeMessage":
        """Rules across fields and against this server's limits, once every field has its type."""
        if self.stream and self.format is not None and self.format not in STREAM_FORMATS:
            raise ValueError(f"'format' {self.format!r} cannot be streamed; use one of: {', '.join(STREAM_FORMATS)}")
        limits = _limits(info)
        if len(self.text) > limits.max_text_chars:
            raise ProtocolError(ErrorCode.TEXT_TOO_LONG, f"'text' has {len(self.text)} characters; the limit is "
                                                         f"{limits.max_text_chars}")
        if self.emotion is not None and self.emotion not in limits.emotions:
            raise ProtocolError(ErrorCode.UNKNOWN_EMOTION, f"Unknown emotion {self.emotion!r}; available: "
                                                           f"{', '.join(limits.emotions) or 'none are configured'}")
        return self

    def request(self) -> SynthesisRequest:
        fmt = self.format or ("pcm" if self.stream else "wav")
        return SynthesisRequest(text=self.text, request_id=self.request_id or new_request_id(), speaker=self.speaker,
                                seed=self.seed, temperature=self.temperature, top_k=self.top_k,
                                max_audio_length_ms=self.max_audio_length_ms, format=fmt, stream=self.stream,
                                context=self.context, emotion=self.emotion, engine=self.engine,
                                language=self.language)


class CancelMessage(_Message):
    """Stop a queued or running request of this connection: its terminal reply becomes ``cancelled``."""

    type: Literal["cancel"]
    request_id: RequestId = Field(description="the id of the request to cancel (1 to 128 characters)")
    played_ms: float | None = Field(None, ge=0, le=MAX_AUDIO_MS, allow_inf_nan=False,
                                    description=f"how much of the reply the listener heard, a number from 0 to "
                                                f"{MAX_AUDIO_MS} (barge-in): only that stays in the history; also "
                                                "for a reply that already finished")


class ResetMessage(_Message):
    """Forget this connection's conversation history (and uploaded voices): ``{"status": "reset"}``."""

    type: Literal["reset"]


class VoiceMessage(_Message):
    """Set a speaker's voice prompt (one binary frame with the audio file follows), or clear it."""

    type: Literal["voice"]
    speaker: Speaker = Field(description="the speaker whose voice it sets: an integer from 0 to "
                                         f"{MAX_SPEAKER}")
    text: str | None = Field(None, min_length=1, max_length=MAX_TRANSCRIPT_CHARS,
                             description=f"the exact transcript of the clip (1 to {MAX_TRANSCRIPT_CHARS} "
                                         "characters); then send the audio file as one binary frame")
    clear: bool = Field(False, description="true or false")

    _speaker = field_validator("speaker", mode="before")(_speaker_digits)

    @model_validator(mode="after")
    def _transcript(self) -> "VoiceMessage":
        if not self.clear and not (self.text or "").strip():
            raise ValueError(f"'voice' needs 'text': {VoiceMessage.model_fields['text'].description}")
        return self


SessionId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$",
                                 description="a session id as the server gave it")]


class SessionMessage(_Message):
    """Bind this connection to a session: a new one (no ``session``), or the one named (resumed, from any
    connection or server sharing the store).  Reply ``{"status": "session", "session", "turns"}``."""

    type: Literal["session"]
    session: SessionId | None = None


class SessionDeleteMessage(_Message):
    """Delete the bound session and its turns; the connection keeps its memory until it closes."""

    type: Literal["session_delete"]


class TurnMessage(_Message):
    """A turn of the other side: what they said, then one binary frame with its audio (WAV, FLAC or OGG).
    Reply ``{"status": "turn_saved", "speaker", "text", "duration_s", "turns"}`` once it is stored."""

    type: Literal["turn"]
    speaker: Speaker = Field(description=f"the speaker who said it: an integer from 0 to {MAX_SPEAKER}")
    text: str | None = Field(None, min_length=1, max_length=MAX_TRANSCRIPT_CHARS,
                             description=f"what was said (1 to {MAX_TRANSCRIPT_CHARS} characters; without it the "
                                         "server transcribes the audio, when it runs with --stt-model); then send "
                                         "the audio file as one binary frame")

    _speaker = field_validator("speaker", mode="before")(_speaker_digits)

    @field_validator("text")
    @classmethod
    def _said(cls, text: str | None) -> str | None:
        return text.strip() or None if text is not None else None


class TurnStartMessage(_Message):
    """A turn of the other side streamed while they speak: binary frames of 16-bit mono PCM follow, then
    ``turn_end``.  No reply unless refused."""

    type: Literal["turn_start"]
    speaker: Speaker = Field(description=f"the speaker who is talking: an integer from 0 to {MAX_SPEAKER}")
    sample_rate: int = Field(24000, ge=8000, le=48000, description="the rate of the PCM frames that follow: an integer "
                                                                    "from 8000 to 48000")

    _speaker = field_validator("speaker", mode="before")(_speaker_digits)


class TurnEndMessage(_Message):
    """The streamed turn is complete; reply ``turn_saved`` once it is stored."""

    type: Literal["turn_end"]
    text: str | None = Field(None, min_length=1, max_length=MAX_TRANSCRIPT_CHARS,
                             description=f"what was said (1 to {MAX_TRANSCRIPT_CHARS} characters; without it the "
                                         "server transcribes the turn, when it runs with --stt-model)")


MESSAGES: dict[str, type[_Message]] = {"synthesize": SynthesizeMessage, "cancel": CancelMessage,
                                       "reset": ResetMessage, "voice": VoiceMessage, "session": SessionMessage,
                                       "session_delete": SessionDeleteMessage, "turn": TurnMessage,
                                       "turn_start": TurnStartMessage, "turn_end": TurnEndMessage}
Message = Union[SynthesizeMessage, CancelMessage, ResetMessage, VoiceMessage, SessionMessage, SessionDeleteMessage,
                TurnMessage, TurnStartMessage, TurnEndMessage]


def parse_message(raw: str | bytes, limits: Limits) -> Message:
    """Turn one WebSocket frame into a validated message, or raise ``ProtocolError``."""
    if isinstance(raw, bytes):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "Binary frames are only accepted after a voice message; "
                                                       "send requests as JSON text frames")
    size = len(raw) if len(raw) * 4 <= MAX_TEXT_FRAME else len(raw.encode("utf-8", "surrogatepass"))
    if size > MAX_TEXT_FRAME:
        raise ProtocolError(ErrorCode.INVALID_REQUEST,
                            f"Text frames are limited to {MAX_TEXT_FRAME // 1024} KiB; this one has {size} bytes")
    data = load_json_object(raw)
    request_id = data.get("request_id")
    if not (isinstance(request_id, str) and 0 < len(request_id) <= MAX_REQUEST_ID_CHARS):
        request_id = None
    model = MESSAGES.get(data.get("type", "synthesize")) if isinstance(data.get("type", ""), str) else None
    if model is None:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"'type' must be one of: {', '.join(MESSAGES)}", request_id)
    return validate(model, data, request_id, context={"limits": limits})


def load_json_object(raw: str | bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(ErrorCode.INVALID_JSON, f"Message is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "Message must be a JSON object")
    return data


def validate(model: type[BaseModel], data: dict[str, Any], request_id: str | None = None,
             context: dict[str, Any] | None = None) -> Any:
    """``model`` from ``data``; a broken rule becomes ``invalid_request`` naming the field (its description)."""
    try:
        return model.model_validate(data, context=context)
    except ProtocolError as exc:
        exc.request_id = exc.request_id or request_id
        raise
    except ValidationError as exc:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, field_message(model, exc), request_id) from None


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


# -- the server's replies, for the published schema (core.replies builds them) ------------------------

class _Reply(BaseModel):
    model_config = ConfigDict(extra="allow")  # replies may gain fields; clients ignore what they do not know


class StartReply(_Reply):
    status: Literal["start"]
    request_id: str
    format: Literal[STREAM_FORMATS]
    sample_rate: int
    channels: Literal[1]
    sample_width: Literal[2]
    engine: str


class SuccessReply(_Reply):
    status: Literal["success"]
    message: str
    request_id: str
    format: Literal[FORMATS]
    sample_rate: int
    length_bytes: int
    duration_s: float
    engine: str
    channels: Literal[1]
    speaker: int
    chunks: int | None = None


class ErrorReply(_Reply):
    status: Literal["error"]
    code: ErrorCode
    message: str
    request_id: str | None = None


class LoadingReply(_Reply):
    status: Literal["loading"]
    message: str
    detail: str
    request_id: str | None = None


class CancelledReply(_Reply):
    status: Literal["cancelled"]
    request_id: str


class TruncatedReply(_Reply):
    status: Literal["truncated"]
    request_id: str
    kept_s: float


class ResetReply(_Reply):
    status: Literal["reset"]


class VoiceSavedReply(_Reply):
    status: Literal["voice_saved"]
    speaker: int
    duration_s: float


class VoiceClearedReply(_Reply):
    status: Literal["voice_cleared"]
    speaker: int
    cleared: bool


class SessionReply(_Reply):
    status: Literal["session"]
    session: str
    turns: int


class SessionDeletedReply(_Reply):
    status: Literal["session_deleted"]
    session: str


class TurnSavedReply(_Reply):
    status: Literal["turn_saved"]
    speaker: int
    text: str
    duration_s: float
    turns: int


Reply = Union[StartReply, SuccessReply, ErrorReply, LoadingReply, CancelledReply, ResetReply, VoiceSavedReply,
              VoiceClearedReply, SessionReply, SessionDeletedReply, TurnSavedReply, TruncatedReply]


class _Protocol(BaseModel):
    client: Message
    server: Reply


def json_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of every client message (``client``) and server reply (``server``)."""
    schema = _Protocol.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "websocket.schema.json",
            "title": f"CSM TTS server WebSocket protocol v{PROTOCOL_VERSION}", "$defs": schema["$defs"],
            "properties": schema["properties"]}


if __name__ == "__main__":  # python -m tts_server.api.schemas > websocket.schema.json
    print(json.dumps(json_schema(), indent=2))
