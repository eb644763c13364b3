"""Protocol v1 of the WebSocket as pydantic models: one source for field types, ranges, defaults and the JSON Schema.

Text frames carry JSON objects; audio travels in binary frames.  ``parse_message``
turns one frame into a validated message or raises ``Refusal`` with a
stable code and a message naming the field (``'speaker' must be an integer from
0 to 1000000``): the message is the field's ``description``, so the rule a
client reads is the rule that is checked.  Rules that depend on the server
(text length, emotions, engines) read a ``Limits`` passed as validation context.
``json_schema()`` publishes the client messages and the server's replies, the
latter generated from the core's events (``api/reply_schema.py``) by the rule
the WebSocket encodes them with (``GET /v1/websocket.schema.json``;
docs/protocol.md).  Pure: no sockets, no model.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Union

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from ..core.replies import PROTOCOL_VERSION, ErrorCode, Refusal
from ..engines import registry
from ..engines.request import (FORMATS, MAX_AUDIO_MS, MAX_SPEAKER, STREAM_FORMATS, SynthesisRequest,
                               new_request_id)
from .dialogue_schemas import (RespondMessage, SessionDeleteMessage, SessionMessage, TurnEndMessage, TurnMessage,
                               TurnStartMessage)
from .reply_schema import Reply
from .schema_rules import (ENCODABLE_RULE, LANGUAGE_PATTERN, LANGUAGE_RULE, MAX_REQUEST_ID_CHARS, MAX_TEXT_FRAME,
                           MAX_TRANSCRIPT_CHARS, SPEAKABLE_RULE, Limits, MessageBase, RequestId,
                           SamplingFields, Speaker, encodable, field_message, limits_of, load_json_object, non_empty,
                           null_is_unset, speakable, speaker_digits, validate)

__all__ = ["LANGUAGE_PATTERN", "Limits", "field_message", "json_schema", "non_empty", "null_is_unset",
           "parse_message", "validate"]


class SynthesizeMessage(MessageBase, SamplingFields):
    """Speak ``text``; the reply is ``success`` + one binary frame, or ``start``, binary chunks and ``success``."""

    type: Literal["synthesize"] = "synthesize"
    text: str = Field("", description=f"{SPEAKABLE_RULE}; with 'text_stream', the text's beginning (may be empty)")
    speaker: Speaker = 0
    format: Literal[FORMATS] | None = Field(None, description=f"one of: {', '.join(FORMATS)} (streams: "
                                                              f"{', '.join(STREAM_FORMATS)}; default wav, or pcm "
                                                              "when streaming)")
    stream: bool = Field(False, description="true or false")
    context: bool = Field(True, description="true or false")
    emotion: str | None = Field(None, description="the name of a configured emotion (see /v1/info)")
    engine: str | None = Field(None, description=f"one of: {', '.join(registry.names())}")  # Limits.engines checks
    language: str | None = Field(None, pattern=LANGUAGE_PATTERN, description=LANGUAGE_RULE)
    speed: float = Field(1.0, ge=0.25, le=4.0, allow_inf_nan=False, description="a number from 0.25 to 4.0")
    timestamps: bool = Field(False, description="true or false (word times: 'words' replies, or in 'success')")
    progress: bool = Field(False, description="true or false (a 'progress' reply after each sentence)")
    text_stream: bool = Field(False, description="true or false (the text follows in 'text' messages, ended by "
                                                 "'text_end'; spoken sentence by sentence as they complete)")

    _speaker = field_validator("speaker", mode="before")(speaker_digits)

    @field_validator("text")
    @classmethod
    def _text(cls, text: str) -> str:
        if not encodable(text):
            raise ValueError(ENCODABLE_RULE)
        return text  # trimmed below, unless it is a stream's beginning ("Good morning to " + "you")

    @field_validator("engine")
    @classmethod
    def _engine(cls, engine: str | None, info: ValidationInfo) -> str | None:
        if engine is not None and engine not in limits_of(info).engines:
            raise ValueError("not an engine of this server")
        return engine

    @model_validator(mode="after")
    def _server_rules(self, info: ValidationInfo) -> "SynthesizeMessage":
        """Rules across fields and against this server's limits, once every field has its type."""
        if self.stream and self.format is not None and self.format not in STREAM_FORMATS:
            raise ValueError(f"'format' {self.format!r} cannot be streamed; use one of: {', '.join(STREAM_FORMATS)}")
        if not self.text_stream and not speakable(self.text):
            raise ValueError(f"'text' must be {SPEAKABLE_RULE}")
        if not self.text_stream:
            self.text = self.text.strip()
        limits = limits_of(info)
        if len(self.text) > limits.max_text_chars:
            raise Refusal(ErrorCode.TEXT_TOO_LONG, f"'text' has {len(self.text)} characters; the limit is "
                                                   f"{limits.max_text_chars}")
        if self.emotion is not None and self.emotion not in limits.emotions:
            raise Refusal(ErrorCode.UNKNOWN_EMOTION, f"Unknown emotion {self.emotion!r}; available: "
                                                     f"{', '.join(limits.emotions) or 'none are configured'}")
        return self

    def to_request(self) -> SynthesisRequest:
        """Its fields are the request's (same names); only the id and the format's default are decided here."""
        return SynthesisRequest.of(dict(self), request_id=self.request_id or new_request_id(),
                                   format=self.format or ("pcm" if self.stream else "wav"))


class CancelMessage(MessageBase):
    """Stop a queued or running request of this connection: its terminal reply becomes ``cancelled``."""

    type: Literal["cancel"]
    request_id: RequestId = Field(description="the id of the request to cancel (1 to 128 characters)")
    played_ms: float | None = Field(None, ge=0, le=MAX_AUDIO_MS, allow_inf_nan=False,
                                    description=f"how much of the reply the listener heard, a number from 0 to "
                                                f"{MAX_AUDIO_MS} (barge-in): only that stays in the history; also "
                                                "for a reply that already finished")


class TextMessage(MessageBase):
    """The next piece of a streamed text (a ``synthesize`` with ``text_stream``), as an LLM writes it."""

    type: Literal["text"]
    request_id: RequestId = Field(description="the id of the streamed request (1 to 128 characters)")
    delta: str = Field(description="a string of valid Unicode (no lone surrogates): the next piece of the text, cut "
                                   "anywhere (the whole text is at most the server's text limit)")
    flush: bool = Field(False, description="true or false (speak what is pending now, as if the text ended here)")

    @field_validator("delta")
    @classmethod
    def _delta(cls, delta: str) -> str:
        if not encodable(delta):
            raise ValueError(ENCODABLE_RULE)
        return delta


class TextEndMessage(MessageBase):
    """A streamed text is complete: the rest is spoken, then the reply ends as any other."""

    type: Literal["text_end"]
    request_id: RequestId = Field(description="the id of the streamed request (1 to 128 characters)")


class ResetMessage(MessageBase):
    """Forget this connection's conversation history (and uploaded voices): ``{"status": "reset"}``."""

    type: Literal["reset"]


class VoiceMessage(MessageBase):
    """Set a speaker's voice prompt (one binary frame with the audio file follows), or clear it."""

    type: Literal["voice"]
    speaker: Speaker = Field(description="the speaker whose voice it sets: an integer from 0 to "
                                         f"{MAX_SPEAKER}")
    text: str | None = Field(None, min_length=1, max_length=MAX_TRANSCRIPT_CHARS,
                             description=f"the exact transcript of the clip (1 to {MAX_TRANSCRIPT_CHARS} "
                                         "characters); then send the audio file as one binary frame")
    clear: bool = Field(False, description="true or false")

    _speaker = field_validator("speaker", mode="before")(speaker_digits)

    @model_validator(mode="after")
    def _transcript(self) -> "VoiceMessage":
        if not self.clear and not (self.text or "").strip():
            raise ValueError(f"'voice' needs 'text': {VoiceMessage.model_fields['text'].description}")
        return self


MESSAGES: dict[str, type[MessageBase]] = {"synthesize": SynthesizeMessage, "cancel": CancelMessage,
                                       "reset": ResetMessage, "voice": VoiceMessage, "session": SessionMessage,
                                       "session_delete": SessionDeleteMessage, "turn": TurnMessage,
                                       "turn_start": TurnStartMessage, "turn_end": TurnEndMessage,
                                       "respond": RespondMessage, "text": TextMessage, "text_end": TextEndMessage}
Message = Union[SynthesizeMessage, CancelMessage, ResetMessage, VoiceMessage, SessionMessage, SessionDeleteMessage,
                TurnMessage, TurnStartMessage, TurnEndMessage, RespondMessage, TextMessage, TextEndMessage]


def parse_message(raw: str | bytes, limits: Limits) -> Message:
    """Turn one WebSocket frame into a validated message, or raise ``Refusal``."""
    if isinstance(raw, bytes):
        raise Refusal(ErrorCode.INVALID_REQUEST, "Binary frames are only accepted after a voice message; "
                                                 "send requests as JSON text frames")
    size = len(raw) if len(raw) * 4 <= MAX_TEXT_FRAME else len(raw.encode("utf-8", "surrogatepass"))
    if size > MAX_TEXT_FRAME:
        raise Refusal(ErrorCode.INVALID_REQUEST,
                      f"Text frames are limited to {MAX_TEXT_FRAME // 1024} KiB; this one has {size} bytes")
    data = load_json_object(raw)
    request_id = data.get("request_id")
    if not (isinstance(request_id, str) and 0 < len(request_id) <= MAX_REQUEST_ID_CHARS):
        request_id = None
    model = MESSAGES.get(data.get("type", "synthesize")) if isinstance(data.get("type", ""), str) else None
    if model is None:
        raise Refusal(ErrorCode.INVALID_REQUEST, f"'type' must be one of: {', '.join(MESSAGES)}", request_id)
    try:
        return validate(model, data, request_id, context={"limits": limits})
    except Refusal as exc:
        if model in (TextMessage, TextEndMessage):  # a bad piece: it ends its stream (the WebSocket decides)
            raise PieceRefusal(exc.code, exc.message, exc.request_id) from None
        raise


class PieceRefusal(Refusal):
    """A ``text`` or ``text_end`` message that breaks a rule: the end of its stream, if that is open."""


# -- the published schema: the server's replies are generated from the core's events (api/reply_schema.py) ----

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
