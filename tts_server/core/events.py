"""What the core tells a client, as typed events: each interface encodes them in its own wire format.

A job's outbox holds tuples of these (a whole file's ``Succeeded`` and its
``Audio`` travel together, so no other reply splits them); a conversation sends
its own (``TurnSaved``, ``Truncated``, ...).  Field names are the WebSocket's
(docs/protocol.md): its adapter writes ``{"status": kind, **fields}``, leaving
out an optional field that is ``None``; the published reply schema is generated
from these classes.  The OpenAI and Wyoming adapters read the same fields.

Frozen dataclasses, not dicts: a typo is an error where it is made, and no
adapter parses what the core wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import ClassVar, Literal

from ..engines.base import Word
from ..engines.errors import ErrorCode, Refusal
from ..engines.request import FORMATS, STREAM_FORMATS

PROTOCOL_VERSION = 1
# The text clients of the original protocol know; ``detail`` says which engine, in our words.
LOADING_MESSAGE = "TTS model is still loading, request will be processed when ready"
SUCCESS_MESSAGE = "Audio generated successfully"


class EventKind(str, Enum):
    """Every reply a client can get: the WebSocket's ``status``."""

    START = "start"
    SUCCESS = "success"
    ERROR = "error"
    LOADING = "loading"
    CANCELLED = "cancelled"
    WORDS = "words"
    PROGRESS = "progress"
    REPLY_TEXT = "reply_text"
    TRUNCATED = "truncated"
    RESET = "reset"
    VOICE_SAVED = "voice_saved"
    VOICE_CLEARED = "voice_cleared"
    SESSION = "session"
    SESSION_DELETED = "session_deleted"
    TURN_SAVED = "turn_saved"
    SPEECH_START = "speech_start"
    SPEECH_END = "speech_end"


@dataclass(frozen=True, slots=True)
class Audio:
    """Audio bytes of a reply: 16-bit PCM chunks while streaming (the first with a WAV header for a streamed
    ``wav``), or the whole encoded file after its ``Succeeded``."""

    data: bytes


@dataclass(frozen=True)
class Event:
    kind: ClassVar[EventKind]


# -- a job's replies -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Started(Event):
    """A streamed reply begins; its audio chunks follow."""

    kind: ClassVar[EventKind] = EventKind.START
    request_id: str
    format: Literal[STREAM_FORMATS]
    sample_rate: int
    engine: str
    voice: str | None = None
    channels: Literal[1] = 1
    sample_width: Literal[2] = 2


@dataclass(frozen=True)
class Succeeded(Event):
    """The reply is complete: before its file (whole), or after its last chunk (streamed)."""

    kind: ClassVar[EventKind] = EventKind.SUCCESS
    request_id: str
    format: Literal[FORMATS]
    sample_rate: int
    length_bytes: int
    duration_s: float
    engine: str
    speaker: int
    voice: str | None = None
    chunks: int | None = None  # streamed: how many audio chunks were sent
    words: tuple[Word, ...] | None = None  # a whole file with ``timestamps``
    words_unavailable: str | None = None  # ``timestamps`` asked, and why there are none
    generation_s: float | None = None
    ttfa_ms: float | None = None
    truncated: bool | None = None  # ``max_audio_length_ms`` (or the text limit of an answer) cut it
    cached: bool | None = None  # answered from the response cache
    message: str = SUCCESS_MESSAGE
    channels: Literal[1] = 1


@dataclass(frozen=True)
class Failed(Event):
    """A request refused or failed (``Refusal`` on the wire), with its stable code."""

    kind: ClassVar[EventKind] = EventKind.ERROR
    code: ErrorCode
    message: str
    request_id: str | None = None

    def refusal(self) -> Refusal:
        """The failure as the one error type, for an interface that raises it to its own error handling."""
        return Refusal(self.code, self.message, self.request_id)


@dataclass(frozen=True)
class Loading(Event):
    """The engine that will answer is still loading: the request waits for it."""

    kind: ClassVar[EventKind] = EventKind.LOADING
    detail: str
    request_id: str | None = None
    message: str = LOADING_MESSAGE


@dataclass(frozen=True)
class Cancelled(Event):
    kind: ClassVar[EventKind] = EventKind.CANCELLED
    request_id: str


@dataclass(frozen=True)
class Words(Event):
    """Words of a streamed reply (``timestamps``), each sent once the audio holding it has been sent."""

    kind: ClassVar[EventKind] = EventKind.WORDS
    request_id: str
    words: tuple[Word, ...]


@dataclass(frozen=True)
class Progress(Event):
    """After each sentence (``progress``): how many are done, of how many (None: the text is still being written)."""

    kind: ClassVar[EventKind] = EventKind.PROGRESS
    request_id: str
    sentence: int
    sentences: int | None
    audio_s: float


@dataclass(frozen=True)
class ReplyText(Event):
    """A piece of the assistant's answer as the chat model writes it (``respond``)."""

    kind: ClassVar[EventKind] = EventKind.REPLY_TEXT
    request_id: str
    delta: str


# -- a conversation's replies --------------------------------------------------------------------------

@dataclass(frozen=True)
class Truncated(Event):
    """A reply cut by barge-in: only ``kept_s`` seconds of it stay in the conversation."""

    kind: ClassVar[EventKind] = EventKind.TRUNCATED
    request_id: str
    kept_s: float


@dataclass(frozen=True)
class Reset(Event):
    kind: ClassVar[EventKind] = EventKind.RESET


@dataclass(frozen=True)
class VoiceSaved(Event):
    kind: ClassVar[EventKind] = EventKind.VOICE_SAVED
    speaker: int
    duration_s: float


@dataclass(frozen=True)
class VoiceCleared(Event):
    kind: ClassVar[EventKind] = EventKind.VOICE_CLEARED
    speaker: int
    cleared: bool


@dataclass(frozen=True)
class SessionBound(Event):
    """The connection's conversation is this session now (new, or resumed with its ``turns``)."""

    kind: ClassVar[EventKind] = EventKind.SESSION
    session: str
    turns: int


@dataclass(frozen=True)
class SessionDeleted(Event):
    kind: ClassVar[EventKind] = EventKind.SESSION_DELETED
    session: str


@dataclass(frozen=True)
class TurnSaved(Event):
    """The other side's turn is kept (stored, when a session is bound)."""

    kind: ClassVar[EventKind] = EventKind.TURN_SAVED
    speaker: int
    text: str
    duration_s: float
    turns: int


@dataclass(frozen=True)
class SpeechStarted(Event):
    """Hands-free listening: the speaker started talking (barge-in: stop playing)."""

    kind: ClassVar[EventKind] = EventKind.SPEECH_START


@dataclass(frozen=True)
class SpeechEnded(Event):
    """Hands-free listening: the speaker stopped; the turn is transcribed and saved next."""

    kind: ClassVar[EventKind] = EventKind.SPEECH_END


REPLIES: tuple[type[Event], ...] = (Started, Succeeded, Failed, Loading, Cancelled, Words, Progress, ReplyText,
                                    Truncated, Reset, VoiceSaved, VoiceCleared, SessionBound, SessionDeleted,
                                    TurnSaved, SpeechStarted, SpeechEnded)
Frame = Event | Audio


def failed(refusal) -> Failed:
    """A ``Refusal`` as the event that tells the client."""
    return Failed(refusal.code, refusal.message, refusal.request_id)
