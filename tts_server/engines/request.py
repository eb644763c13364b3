"""What an engine is asked to say: ``SynthesisRequest`` and the bounds of its fields.

Every interface (WebSocket, OpenAI HTTP, Wyoming) validates its own wire format
into this one dataclass; the core queues it and an engine speaks it.  The bounds
live here, below every interface, so the schemas of all of them share them.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

FORMATS = ("wav", "pcm", "flac", "ogg")  # whole-file formats of the WebSocket
STREAM_FORMATS = ("pcm", "wav")
MAX_AUDIO_MS = 90_000
MIN_AUDIO_MS = 80  # one CSM frame
MAX_SPEAKER = 1_000_000
DEFAULT_TEMPERATURE = 0.9
DEFAULT_TOP_K = 50
MAX_SEED = 2**63 - 1
ENGINES = ("csm", "piper", "remote")  # the engines a chain may hold (--engines) and a request may name
LANGUAGE_CODE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8}){0,2}")
# OpenAI's voice names, each a fixed speaker id (0 alloy, 1 ash, ...): the OpenAI API resolves them, the remote
# engine maps speaker ids back to them.
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
                 "marin", "cedar")


@dataclass(frozen=True)
class SynthesisRequest:
    """A validated request; field names and defaults are the WebSocket's."""

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
    speed: float = 1.0  # speaking rate, 0.25 to 4 (Piper natively; CSM's audio is time-stretched)
    language: str | None = None  # ISO 639 code, optionally with a region ("de", "en_US", "pt-BR"): picks the engine
    timestamps: bool = False  # word times: "words" replies while streaming, in "success" for a whole file
    progress: bool = False  # a "progress" reply after each sentence


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]
