"""What an engine is asked to say: ``SynthesisRequest`` and the bounds of its fields.

Every interface (WebSocket, OpenAI HTTP, Wyoming) validates its own wire format
into this one dataclass; the core queues it and an engine speaks it.  The bounds
live here, below every interface, so the schemas of all of them share them.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping

from ..audio.pcm import FRAME_MS

FORMATS = ("wav", "pcm", "flac", "ogg")  # whole-file formats of the WebSocket
STREAM_FORMATS = ("pcm", "wav")
MAX_AUDIO_MS = 90_000
MIN_AUDIO_MS = FRAME_MS  # one CSM frame
MAX_SPEAKER = 1_000_000
DEFAULT_TEMPERATURE = 0.9
DEFAULT_TOP_K = 50
MAX_SEED = 2**63 - 1
LANGUAGE_CODE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8}){0,2}")
# OpenAI's voice names, each a fixed speaker id (0 alloy, 1 ash, ...): the OpenAI API resolves them, the remote
# engine maps speaker ids back to them.
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
                 "marin", "cedar")


SHAPES = "shapes"  # a field's metadata key: True when it shapes the audio or the replies (a response-cache key part)
SHAPING = MappingProxyType({SHAPES: True})
NOT_SHAPING = MappingProxyType({SHAPES: False})


@dataclass(frozen=True)
class SynthesisRequest:
    """A validated request; field names and defaults are the WebSocket's.

    Each field says (``SHAPES`` in its metadata) whether it shapes the audio or
    the replies: those make the response cache's key, so a new field must
    choose, and ``shaping_fields`` refuses one that does not.
    """

    text: str = field(metadata=SHAPING)  # what is said
    request_id: str = field(metadata=NOT_SHAPING)  # the client's label for the replies: any id, the same audio
    speaker: int = field(default=0, metadata=SHAPING)  # whose voice
    seed: int | None = field(default=None, metadata=SHAPING)  # CSM's sampling: one seed, one audio
    temperature: float = field(default=DEFAULT_TEMPERATURE, metadata=SHAPING)  # CSM's sampling
    top_k: int = field(default=DEFAULT_TOP_K, metadata=SHAPING)  # CSM's sampling
    max_audio_length_ms: float | None = field(default=None, metadata=SHAPING)  # cuts the audio (and "truncated")
    format: str = field(default="wav", metadata=SHAPING)  # the bytes sent
    stream: bool = field(default=False, metadata=SHAPING)  # chunks and "start", or one file
    context: bool = field(default=True, metadata=SHAPING)  # the conversation so far primes the voice
    emotion: str | None = field(default=None, metadata=SHAPING)  # a prompt that colours the voice
    engine: str | None = field(default=None, metadata=SHAPING)  # who speaks it
    # speaking rate, 0.25 to 4 (Piper natively; CSM's audio is time-stretched)
    speed: float = field(default=1.0, metadata=SHAPING)
    # ISO 639 code, optionally with a region ("de", "en_US", "pt-BR"): picks the engine
    language: str | None = field(default=None, metadata=SHAPING)
    # word times: "words" replies while streaming, in "success" for a whole file
    timestamps: bool = field(default=False, metadata=SHAPING)
    progress: bool = field(default=False, metadata=SHAPING)  # a "progress" reply after each sentence

    @classmethod
    def of(cls, values: Mapping[str, Any], **given: Any) -> "SynthesisRequest":
        """A request from an interface's validated values: those named like a field of the request are that field
        (a schema's extra fields are left out), then ``given`` (what the interface decides or names otherwise)."""
        return cls(**{**{name: value for name, value in values.items() if name in _NAMES}, **given})


def shaping_fields(cls: type = SynthesisRequest) -> tuple[str, ...]:
    """The names of the fields of the dataclass ``cls`` that shape the audio or replies; a field that does not say
    is refused here (at import, for ``SynthesisRequest``) rather than silently left out of the cache key."""
    unmarked = [f.name for f in fields(cls) if not isinstance(f.metadata.get(SHAPES), bool)]
    if unmarked:
        raise TypeError(f"{cls.__name__} fields {', '.join(unmarked)} do not say whether they shape the audio or "
                        f"replies: give each field(metadata={{{SHAPES!r}: True or False}})")
    return tuple(f.name for f in fields(cls) if f.metadata[SHAPES])


_NAMES = frozenset(f.name for f in fields(SynthesisRequest))
SHAPING_FIELDS = shaping_fields()  # in declaration order: the response cache's key


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]
