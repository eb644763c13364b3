"""The WebSocket's conversation messages: sessions, the other side's turns (sent whole, streamed, or heard
hands-free), and ``respond`` (the assistant's answer, written by an LLM and spoken as it is written).  Pure."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from ..audio.pcm import OUTPUT_RATE
from ..engines.request import MAX_SPEAKER, STREAM_FORMATS, SynthesisRequest
from ..engines.stt import whisper_language
from .schema_rules import MAX_TRANSCRIPT_CHARS, MessageBase, SamplingFields, Speaker, speaker_digits

SessionId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$",
                                 description="a session id as the server gave it")]


class SessionMessage(MessageBase):
    """Bind this connection to a session: a new one (no ``session``), or the one named (resumed, from any
    connection or server sharing the store).  Reply ``{"status": "session", "session", "turns"}``."""

    type: Literal["session"]
    session: SessionId | None = None


class SessionDeleteMessage(MessageBase):
    """Delete the bound session and its turns; the connection keeps its memory until it closes."""

    type: Literal["session_delete"]


class TurnMessage(MessageBase):
    """A turn of the other side: what they said, then one binary frame with its audio (WAV, FLAC or OGG).
    Reply ``{"status": "turn_saved", "speaker", "text", "duration_s", "turns"}`` once it is stored."""

    type: Literal["turn"]
    speaker: Speaker = Field(description=f"the speaker who said it: an integer from 0 to {MAX_SPEAKER}")
    text: str | None = Field(None, min_length=1, max_length=MAX_TRANSCRIPT_CHARS,
                             description=f"what was said (1 to {MAX_TRANSCRIPT_CHARS} characters; without it the "
                                         "server transcribes the audio, when it runs with --stt-model); then send "
                                         "the audio file as one binary frame")

    _speaker = field_validator("speaker", mode="before")(speaker_digits)

    @field_validator("text")
    @classmethod
    def _said(cls, text: str | None) -> str | None:
        return text.strip() or None if text is not None else None


class AnswerOptions(SamplingFields):
    """How the assistant answers: its speaker and CSM's sampling (the fields of ``respond``)."""

    speaker: Speaker = Field(0, description=f"the assistant's speaker: an integer from 0 to {MAX_SPEAKER}")
    format: Literal[STREAM_FORMATS] = Field("pcm", description=f"one of: {', '.join(STREAM_FORMATS)}")

    timestamps: bool = Field(False, description="true or false (word times: 'words' replies)")

    _speaker = field_validator("speaker", mode="before")(speaker_digits)

    def to_request(self, request_id: str) -> SynthesisRequest:
        """The answer's request: its fields are the request's (same names); it is always streamed, and its text is
        a placeholder (the chat model writes the sentences, each spoken as it comes)."""
        return SynthesisRequest.of(dict(self), text="…", request_id=request_id, stream=True)


class TurnStartMessage(MessageBase):
    """A turn of the other side streamed while they speak: binary frames of 16-bit mono PCM follow, then
    ``turn_end``.  With ``vad`` the server listens hands-free instead: each utterance ends at a pause
    (``speech_start`` / ``speech_end``, then ``turn_saved``) until ``turn_end``.  No reply unless refused."""

    type: Literal["turn_start"]
    speaker: Speaker = Field(description=f"the speaker who is talking: an integer from 0 to {MAX_SPEAKER}")
    sample_rate: int = Field(OUTPUT_RATE, ge=8000, le=48000, description="the rate of the PCM frames that follow: an integer "
                                                                    "from 8000 to 48000")
    vad: bool = Field(False, description="true or false (true: the server ends each utterance at a pause)")
    respond: AnswerOptions | None = Field(None, description="an object with the fields of 'respond' (the assistant "
                                                            "answers each saved turn)")
    language: str | None = Field(None, description="the language the speaker speaks, a Whisper language code (en, "
                                                   "de, fr, ...): transcribed without detecting it (faster)")

    _speaker = field_validator("speaker", mode="before")(speaker_digits)

    @field_validator("language")
    @classmethod
    def _known_language(cls, value: str | None) -> str | None:
        if value is not None and not whisper_language(value):
            raise ValueError("must be a Whisper language code such as en, de or fr")
        return value


class TurnEndMessage(MessageBase):
    """The streamed turn is complete; reply ``turn_saved`` once it is stored."""

    type: Literal["turn_end"]
    text: str | None = Field(None, min_length=1, max_length=MAX_TRANSCRIPT_CHARS,
                             description=f"what was said (1 to {MAX_TRANSCRIPT_CHARS} characters; without it the "
                                         "server transcribes the turn, when it runs with --stt-model)")


class RespondMessage(AnswerOptions, MessageBase):
    """The assistant answers the session: the chat model (--chat-url) writes the reply to the transcript, sent as
    ``reply_text`` deltas, and it is spoken sentence by sentence as one streamed reply (``start``, chunks,
    ``success``) that joins the history.  Cancel it like any request (``played_ms`` for barge-in)."""

    type: Literal["respond"]

