"""The shared core every interface adapter talks to, made of parts with one job each.

One ``Service`` per process; it holds no sockets.  The interfaces (``api``)
translate their wire formats into requests and ``Job``s and use the parts:

- ``admission``: who may connect (limits, keys, proxies), whose sessions they use;
- ``scheduler``: the queue, the engine chain and its workers, the response cache;
- ``speech``: speech recognition (turns without text, word times);
- ``turns``: the other side's audio (turn encoding, streamed turns, listening);
- ``sessions``: the session store (chosen in one place, ``session_calls.open_store``);
- ``metrics``: Prometheus counters and the gauges ``refresh_gauges`` sets;
- ``library``, ``chat``, ``limits``: voices and emotions, the chat model, per-request limits.

This object itself only answers what spans the parts: which engine serves now
and why, ``/v1/info``'s engine and conversation facts, and background tasks.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from ..audio.pcm import OUTPUT_RATE
from ..engines import registry
from ..engines.chat import ChatModel
from ..engines.stt import Transcriber, whisper_languages
from .admission import Admission
from .cache import AudioCache
from .context import ReferenceLibrary
from .jobs import EngineSlot, EngineState
from .metrics import Metrics
from .pacing import AUDIO_BURST_SECONDS, AUDIO_SPEED
from .routing import Chain
from .scheduler import Scheduler
from .security import Gate
from .session_calls import Sessions
from .speech import SpeechRecognition
from .turn_work import TurnDetector, TurnEncoding
from .turns import TURN_TIMEOUT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one request or connection may ask, on every interface."""

    max_text_chars: int = 4000
    max_context_turns: int = 8  # turns of history a connection keeps (and a session prompt uses)
    rate_limit: int = 120  # requests a minute per connection (per address on HTTP)
    max_queued_per_connection: int = 8
    max_voice_bytes: int = 10 * 1024 * 1024
    max_voice_seconds: float = 30
    text_timeout: float = 10  # seconds a streamed text may go without completing a sentence or ending


class Service:
    """The parts (see the module docstring) and what spans them."""

    def __init__(self, *engines: EngineSlot | None, overflow_engine: str | None = None, cache_bytes: int = 0,
                 engine_costs: dict[str, float] | None = None, max_queue: int = 32, max_text_chars: int = 4000,
                 sample_rate: int = OUTPUT_RATE, stream_buffer_seconds: float = 30,
                 library: ReferenceLibrary | None = None, max_context_turns: int = 8, gate: Gate | None = None,
                 max_connections: int = 256, max_connections_per_address: int = 16, rate_limit: int = 120,
                 max_queued_per_connection: int = 8, max_voice_bytes: int = 10 * 1024 * 1024,
                 max_voice_seconds: float = 30, generation_timeout: float = 120,
                 trusted_proxies: tuple[str, ...] = (), session_store: str = "memory", session_ttl: float = 86400,
                 max_sessions: int = 10000, max_session_bytes: int = 4 * 2**20, max_sessions_per_owner: int = 1000,
                 session_sweep_seconds: float = 30, stt: Transcriber | None = None,
                 chat: ChatModel | None = None, vad_silence_ms: float | None = None, vad_pause_ms: float = 200,
                 audio_burst_seconds: float = AUDIO_BURST_SECONDS, audio_speed: float = AUDIO_SPEED,
                 turn_timeout: float = TURN_TIMEOUT, turn_detector: str = "vad",
                 turn_max_silence_ms: float = 3000, stt_language: str | None = None,
                 text_timeout: float = 10) -> None:
        self.limits = Limits(max_text_chars, max_context_turns, rate_limit, max_queued_per_connection,
                             max_voice_bytes, max_voice_seconds, text_timeout)
        self.admission = Admission(gate, trusted_proxies, max_connections, max_connections_per_address)
        self.library = library or ReferenceLibrary(None)
        self.metrics = Metrics(engine_costs)
        chain = Chain([slot for slot in engines if slot is not None], overflow_engine)
        self.scheduler = Scheduler(chain, max_queue=max_queue, sample_rate=sample_rate, metrics=self.metrics,
                                   stream_buffer_seconds=stream_buffer_seconds, generation_timeout=generation_timeout,
                                   cache=AudioCache(cache_bytes))
        # the shared model threads: one each for the whole server, each connection taking its turn
        self.speech = SpeechRecognition(stt, self.admission.admitted, self._dropped_on("stt"), stt_language)
        self.turns = TurnEncoding(chain, self.admission.admitted, self._dropped_on("turn_encoding"),
                                  vad_silence_ms, vad_pause_ms, audio_burst_seconds, audio_speed, turn_timeout,
                                  TurnDetector(turn_detector), turn_max_silence_ms)
        for thread in (self.speech.thread, self.turns.thread):  # a closed connection's waiting work is dropped
            self.admission.on_release(thread.cancel)
        if stt is not None:
            self.scheduler.aligner = self.speech.align
        self.chat = chat  # the assistant's words (--chat-url), for ``respond``
        limits = {"ttl": session_ttl, "max_sessions": max_sessions, "max_bytes": max_session_bytes,
                  "max_per_owner": max_sessions_per_owner}
        self.sessions = Sessions.open(session_store, **limits)  # awaited, on its own threads
        self.session_sweep_seconds = session_sweep_seconds  # expired sessions are deleted this often
        self._background: set[asyncio.Task] = set()

    def _dropped_on(self, thread: str):
        return lambda count: self.metrics.shared_dropped.labels(thread).inc(count)

    @property
    def emotions(self) -> tuple[str, ...]:
        return tuple(sorted(self.library.emotions))

    def conversation_info(self) -> dict[str, Any]:
        """What the voice chat can do here: speech recognition, the end-of-utterance pause, the chat model."""
        return {"stt": self.speech.state, "languages": whisper_languages() if self.speech.stt is not None else [],
                **self.turns.describe(), "chat": self.chat.describe() if self.chat is not None else None}

    # -- state for replies, /ready and /v1/info --------------------------------------------------------
    def background(self, work) -> None:
        """Run ``work`` (a coroutine) without awaiting it, keeping a reference until it ends."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def loading_notice(self) -> str | None:
        primary = self.scheduler.primary
        if primary.state == EngineState.LOADING:
            return f"The {primary.name} model is loading; requests are queued until it is ready"
        return None

    def serving(self) -> tuple[str | None, str]:
        """Which engine answers a request without ``engine`` now, and why, in one sentence."""
        why: list[str] = []
        for slot in self.scheduler.chain.slots:
            if slot.state == EngineState.READY:
                return slot.name, "; ".join([*why, f"serving with {_label(slot)}"])
            if slot.state == EngineState.LOADING:
                return None, "; ".join([*why, f"{_label(slot)} is loading; requests wait for it"])
            why.append(f"{_label(slot)} unavailable: {slot.reason}")
        return None, "; ".join(why)

    def refresh_gauges(self) -> None:
        self.metrics.queue_depth.set(self.scheduler.depth)
        self.metrics.connections.set(self.admission.open_connections)
        for name, slot in self.scheduler.slots.items():
            self.metrics.set_engine_state(name, slot.state)
        cache = self.scheduler.cache
        self.metrics.cache_bytes.set(cache.bytes)
        self.metrics.cache_entries.set(len(cache))
        for name, thread in (("stt", self.speech.thread), ("turn_encoding", self.turns.thread)):
            self.metrics.shared_queued.labels(name).set(thread.pending)

    def engines_info(self) -> dict[str, Any]:
        scheduler = self.scheduler
        return {slot.name: {"role": "primary" if index == 0 else "fallback", "position": index + 1,
                            "overflow": slot is scheduler.chain.overflow, "state": slot.state, "reason": slot.reason,
                            "label": registry.label(slot.name),
                            "capabilities": registry.capabilities(slot.name).describe(),
                            **slot.engine.describe(), "stats": self.metrics.summary(slot.name)}
                for index, slot in enumerate(scheduler.chain.slots)}

    async def close_background(self) -> None:
        await asyncio.gather(*self._background, return_exceptions=True)


def _label(slot: EngineSlot) -> str:
    described = slot.engine.describe()
    name = registry.label(slot.name)
    voice = described.get("voice")
    return f"{name} {voice}" if voice else name
