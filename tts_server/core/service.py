"""The shared core every interface adapter talks to: scheduler, voices, limits, metrics, admission.

One ``Service`` per process.  It holds no sockets: the interfaces (``api``)
translate their wire formats into ``Job``s and hand them to ``scheduler``, and
ask this object who may connect and what the server can do right now.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Hashable

import numpy as np

from ..audio.pcm import FRAME_SAMPLES, OUTPUT_RATE
from ..engines.base import ContextTurn
from ..engines import registry
from ..engines.chat import ChatModel
from ..engines.stt import Transcriber
from . import replies as r
from .cache import AudioCache
from .context import ReferenceLibrary
from .fair import SERVER, Dropped, FairThread, Full
from .jobs import EngineSlot, EngineState
from .listening import Listener
from .metrics import Metrics
from .routing import Chain
from .scheduler import Scheduler
from .security import ConnectionLimits, Gate, ProxyTrust
from .session_calls import Sessions
from .sessions import owner_of
from .pacing import AUDIO_BURST_SECONDS, AUDIO_SPEED, AudioPace
from .turns import TURN_TIMEOUT, StreamedTurn

log = logging.getLogger(__name__)
# What one connection may have waiting on a shared model thread (``fair.FairThread``; each connection takes its turn
# there, one item each).  Its reader awaits its own turns and audio frames, so a client is refused only if it
# floods; a reply's sentences waiting for word times beyond their bound get none (``words_unavailable`` says why).
TRANSCRIPTS_WAITING = 4
TURN_WORK_WAITING = 8
ALIGNMENTS_WAITING = 64


class Service:
    """Everything a request needs besides its connection (see the module docstring)."""

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
                 chat: ChatModel | None = None, vad_silence_ms: float = 600, vad_pause_ms: float = 200,
                 audio_burst_seconds: float = AUDIO_BURST_SECONDS, audio_speed: float = AUDIO_SPEED,
                 turn_timeout: float = TURN_TIMEOUT) -> None:
        self.proxies = ProxyTrust(trusted_proxies)
        self.gate = gate or Gate()
        self.connection_limits = ConnectionLimits(max_connections, max_connections_per_address)
        self._admitted: dict[Hashable, str] = {}  # connection -> the address it is counted under
        self.rate_limit = rate_limit
        self.max_queued_per_connection = max_queued_per_connection
        self.max_voice_bytes, self.max_voice_seconds = max_voice_bytes, max_voice_seconds
        self.max_text_chars = max_text_chars
        self.max_context_turns = max_context_turns
        self.library = library or ReferenceLibrary(None)
        self.draining = False
        self.metrics = Metrics(engine_costs)
        chain = Chain([slot for slot in engines if slot is not None], overflow_engine)
        self.scheduler = Scheduler(chain, max_queue=max_queue, sample_rate=sample_rate, metrics=self.metrics,
                                   stream_buffer_seconds=stream_buffer_seconds, generation_timeout=generation_timeout,
                                   cache=AudioCache(cache_bytes))
        self._background: set[asyncio.Task] = set()
        # the other side's audio (VAD, Mimi), and speech recognition (turns sent without text, CSM's word times):
        # one thread each for the whole server, shared fairly by the connections
        self.turn_encoding = FairThread("turn-encoder", TURN_WORK_WAITING, self._dropped_on("turn_encoding"))
        self.stt, self.stt_failure = stt, None
        self._stt_loaded = asyncio.Event()
        self.stt_thread = FairThread("stt", TRANSCRIPTS_WAITING, self._dropped_on("stt"))
        if stt is not None:
            self.scheduler.aligner = self._align
        self.chat = chat  # the assistant's words (--chat-url), for ``respond``
        # hands-free: the silence that ends an utterance, and the pause after which its transcription starts
        self.vad_silence_ms, self.vad_pause_ms = vad_silence_ms, vad_pause_ms
        # streamed turns: how far ahead of the clock a connection may send audio, and how long one may stay open
        self.audio_burst_seconds, self.audio_speed = audio_burst_seconds, audio_speed
        self.turn_timeout = turn_timeout
        limits = {"ttl": session_ttl, "max_sessions": max_sessions, "max_bytes": max_session_bytes,
                  "max_per_owner": max_sessions_per_owner}
        self.sessions = Sessions.open(session_store, **limits)  # awaited, on its own threads
        self.session_sweep_seconds = session_sweep_seconds  # expired sessions are deleted this often

    async def codes_of(self, audio, connection: Hashable | None = None) -> Any:
        """CSM's Mimi codes of a 24 kHz clip (a turn of the other side), on the turn-encoding thread in
        ``connection``'s turn; waits while CSM loads.  Turns are stored as codes, so a server without CSM cannot
        take them."""
        slot = await self._turn_encoder()
        audio = np.pad(audio, (0, -len(audio) % FRAME_SAMPLES))  # whole frames, as a streamed turn is encoded
        return await self.shared(self.turn_encoding, connection, slot.engine.codes_for, ContextTurn(0, "", audio))

    async def shared(self, thread: FairThread, connection: Hashable | None, fn, *args, limit: int | None = None):
        """``fn(*args)`` on a shared model thread in ``connection``'s turn (an admitted connection, or None: the
        server's own work).  ``Dropped`` once the connection has closed: ``release`` drops what it left waiting,
        and nothing more of it is taken."""
        if connection is not None and connection not in self._admitted:
            raise Dropped("its connection closed")
        return await thread.run(SERVER if connection is None else connection, fn, *args, limit=limit)

    def _dropped_on(self, thread: str):
        return lambda count: self.metrics.shared_dropped.labels(thread).inc(count)

    async def load_stt(self) -> None:
        try:
            if self.stt is not None:
                await asyncio.to_thread(self.stt.load)
        except Exception as exc:  # the server serves on; turns without text are refused with the reason
            self.stt_failure = str(exc) or exc.__class__.__name__
            log.error("Speech recognition unavailable: %s", self.stt_failure)
        finally:
            self._stt_loaded.set()

    def _align(self, owner: Hashable, audio, rate: int, text: str):
        """Word times of ``audio`` saying ``text`` (CSM's sentences) on the transcriber's thread, in the turn of
        ``owner``'s replies (their own turn, beside the connection's transcriptions); from any thread."""
        if not self._stt_loaded.is_set() or self.stt_failure is not None:
            raise RuntimeError(f"the aligner (--stt-model) is {'unavailable' if self.stt_failure else 'loading'}")
        try:
            return self.stt_thread.submit_for(("words", owner), self.stt.align, audio, rate, text,
                                              limit=ALIGNMENTS_WAITING)
        except Full:
            raise RuntimeError(f"word alignment fell behind: {ALIGNMENTS_WAITING} sentences were already waiting "
                               "for the aligner") from None

    async def transcript(self, audio: np.ndarray | None, rate: int = OUTPUT_RATE, connection: Hashable | None = None) -> str:
        """What was said in a turn sent without text (float audio at ``rate``: 24 kHz for a file, a streamed
        turn's ``TRANSCRIPT_RATE``), on the transcriber's thread in ``connection``'s turn; without speech
        recognition, the refusal."""
        if self.stt is None:
            raise r.Refusal(r.ErrorCode.INVALID_REQUEST, "'text' is required: this server has no speech "
                                                               "recognition (start it with --stt-model)")
        await self._stt_loaded.wait()
        if self.stt_failure is not None:
            raise r.Refusal(r.ErrorCode.MODEL_UNAVAILABLE, f"Speech recognition is unavailable: "
                                                                 f"{self.stt_failure}")
        try:
            text = await self.shared(self.stt_thread, connection, self.stt.transcribe, audio, rate,
                                     limit=TRANSCRIPTS_WAITING)
        except Full:
            raise r.Refusal(r.ErrorCode.BUSY, f"{TRANSCRIPTS_WAITING} turns of this connection are already "
                                                    "waiting to be transcribed; send the next once one is saved")
        if not text:
            raise r.Refusal(r.ErrorCode.INVALID_REQUEST, "No speech was recognized in the turn: send its "
                                                               "'text'; the turn was dropped")
        return text

    def audio_pace(self) -> AudioPace:
        """A connection's allowance for the audio of its streamed turns (``core.pacing``)."""
        return AudioPace(self.audio_burst_seconds, self.audio_speed)

    async def stream_turn(self, speaker: int, sample_rate: int) -> StreamedTurn:
        """A turn to be fed as it is spoken (``StreamedTurn``; feed it on ``turn_encoding``)."""
        slot = await self._turn_encoder()
        return StreamedTurn(speaker, sample_rate, slot.engine.stream_encoder())

    async def listener(self, speaker: int, sample_rate: int) -> Listener:
        """Hands-free turns of ``speaker``: utterances cut by voice activity detection (feed it on
        ``turn_encoding``).  Every listener shares the one VAD model, loaded on first use off the event loop; a
        detector is then only its state."""
        from ..engines.vad import SpeechDetector, silero_model

        slot = await self._turn_encoder()
        await asyncio.to_thread(silero_model)
        detector = SpeechDetector(self.vad_silence_ms, pause_ms=self.vad_pause_ms)
        return Listener(sample_rate, detector, lambda: StreamedTurn(speaker, sample_rate, slot.engine.stream_encoder()))

    async def _turn_encoder(self) -> EngineSlot:
        """The chain's engine that keeps turns as its codes (the registry's ``encodes_turns``), once it loaded."""
        slot = next((s for s in self.scheduler.chain.slots if registry.capabilities(s.name).encodes_turns), None)
        if slot is not None:
            await slot.loaded.wait()
        if slot is None or slot.state != EngineState.READY:
            why = slot.reason if slot else "not configured"
            name = registry.label(slot.name) if slot else \
                next((s.label for s in registry.specs() if s.capabilities.encodes_turns), "the turn encoder")
            raise r.Refusal(r.ErrorCode.MODEL_UNAVAILABLE, f"Turns are kept as {name}'s audio codes, and {name} is "
                                                           f"not available here: {why}")
        return slot

    def owner(self, headers, target: str) -> str:
        """Whose sessions a request may use: the hash of the API key it offers; on a server without keys, one
        owner for all (a key a client sends anyway does not split them)."""
        return owner_of(self.gate.offered_key(headers, target) if self.gate.requires_key else None)

    def counted_as(self, owner: str, address: str) -> str:
        """Whose share of the sessions (``max_sessions_per_owner``) a new session takes: its key's; on a server
        without keys, where everyone is one owner, its client address's (hashed, never stored as it is)."""
        return owner if self.gate.requires_key else owner_of(f"address {address}")

    def conversation_info(self) -> dict[str, Any]:
        """What the voice chat can do here: speech recognition, the end-of-utterance pause, the chat model."""
        stt = "off" if self.stt is None else "failed" if self.stt_failure else \
            "ready" if self._stt_loaded.is_set() else "loading"
        return {"stt": stt, "vad_silence_ms": self.vad_silence_ms,
                "chat": self.chat.describe() if self.chat is not None else None}

    @property
    def emotions(self) -> tuple[str, ...]:
        return tuple(sorted(self.library.emotions))

    # -- admission: every connection, whatever it speaks ----------------------------------------------
    def admit(self, connection: Hashable, address: str) -> r.Refusal | None:
        """Count ``connection`` (once, however many requests it carries) under ``address``, or say why it is
        refused.  Admitted connections are released with ``release(connection)`` when they close."""
        if connection in self._admitted:
            return None
        if self.draining:
            return r.Refusal(r.ErrorCode.SHUTTING_DOWN, "The server is shutting down")
        refusal = self.connection_limits.admit(address)
        if refusal is not None:
            return r.Refusal(r.ErrorCode.TOO_MANY_CONNECTIONS, refusal)
        self._admitted[connection] = address
        return None

    def release(self, connection: Hashable) -> None:
        """The connection closed: its place is free, and the work it left on the shared threads is dropped."""
        address = self._admitted.pop(connection, None)
        if address is not None:
            self.connection_limits.release(address)
        self.stt_thread.cancel(connection)
        self.turn_encoding.cancel(connection)

    @property
    def open_connections(self) -> int:
        return len(self._admitted)

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
        self.metrics.connections.set(self.open_connections)
        for name, slot in self.scheduler.slots.items():
            self.metrics.set_engine_state(name, slot.state)
        cache = self.scheduler.cache
        self.metrics.cache_bytes.set(cache.bytes)
        self.metrics.cache_entries.set(len(cache))
        for name, thread in (("stt", self.stt_thread), ("turn_encoding", self.turn_encoding)):
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
