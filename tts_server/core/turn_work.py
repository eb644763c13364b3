"""The other side's audio: turns encoded to the engine's codes, streamed turns, and hands-free listening.

Turns are kept as the codes of the chain's engine that encodes them (CSM's Mimi
codes), so a server without such an engine cannot take them.  Encoding, voice
activity detection and Mimi's streaming encoder run on one thread for the whole
server, shared fairly by the connections (``fair.FairThread``), never on the
event loop.  Streamed audio is paced per connection (``pacing.AudioPace``) and a
turn may stay open ``turn_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Hashable

import numpy as np

from ..audio.pcm import FRAME_SAMPLES
from ..engines import registry
from ..engines.base import ContextTurn
from ..engines.errors import ErrorCode, Refusal
from .fair import SERVER, Dropped, FairThread
from .jobs import EngineSlot, EngineState
from .listening import Listener
from .pacing import AUDIO_BURST_SECONDS, AUDIO_SPEED, AudioPace
from .routing import Chain
from .turns import TURN_TIMEOUT, StreamedTurn

# What one connection may have waiting on the thread (its reader awaits its own frames: refused only if it floods).
TURN_WORK_WAITING = 8


class TurnEncoding:
    def __init__(self, chain: Chain, admitted: Callable[[Hashable], bool],
                 on_dropped: Callable[[int], None] = lambda count: None, vad_silence_ms: float = 600,
                 vad_pause_ms: float = 200, audio_burst_seconds: float = AUDIO_BURST_SECONDS,
                 audio_speed: float = AUDIO_SPEED, turn_timeout: float = TURN_TIMEOUT) -> None:
        self.chain = chain
        self._admitted = admitted
        self.thread = FairThread("turn-encoder", TURN_WORK_WAITING, on_dropped)
        # hands-free: the silence that ends an utterance, and the pause after which its transcription starts
        self.vad_silence_ms, self.vad_pause_ms = vad_silence_ms, vad_pause_ms
        # streamed turns: how far ahead of the clock a connection may send audio, and how long one may stay open
        self.audio_burst_seconds, self.audio_speed = audio_burst_seconds, audio_speed
        self.turn_timeout = turn_timeout

    async def run(self, connection: Hashable | None, fn, *args) -> Any:
        """``fn(*args)`` on the turn-encoding thread in ``connection``'s turn (an admitted connection, or None: the
        server's own work); ``Dropped`` once the connection has closed."""
        if connection is not None and not self._admitted(connection):
            raise Dropped("its connection closed")
        return await self.thread.run(SERVER if connection is None else connection, fn, *args)

    async def codes_of(self, audio: np.ndarray, connection: Hashable | None = None) -> Any:
        """The turn encoder's codes of a 24 kHz clip (a turn sent whole), in ``connection``'s turn; waits while the
        engine loads."""
        slot = await self.encoder()
        audio = np.pad(audio, (0, -len(audio) % FRAME_SAMPLES))  # whole frames, as a streamed turn is encoded
        return await self.run(connection, slot.engine.codes_for, ContextTurn(0, "", audio))

    def audio_pace(self) -> AudioPace:
        """A connection's allowance for the audio of its streamed turns (``core.pacing``)."""
        return AudioPace(self.audio_burst_seconds, self.audio_speed)

    async def stream_turn(self, speaker: int, sample_rate: int) -> StreamedTurn:
        """A turn to be fed as it is spoken (feed it with ``run``)."""
        slot = await self.encoder()
        return StreamedTurn(speaker, sample_rate, slot.engine.stream_encoder())

    async def listener(self, speaker: int, sample_rate: int) -> Listener:
        """Hands-free turns of ``speaker``: utterances cut by voice activity detection (feed it with ``run``).
        Every listener shares the one VAD model, loaded on first use off the event loop."""
        from ..engines.vad import SpeechDetector, silero_model

        slot = await self.encoder()
        await asyncio.to_thread(silero_model)
        detector = SpeechDetector(self.vad_silence_ms, pause_ms=self.vad_pause_ms)
        return Listener(sample_rate, detector, lambda: StreamedTurn(speaker, sample_rate, slot.engine.stream_encoder()))

    async def encoder(self) -> EngineSlot:
        """The chain's engine that keeps turns as its codes (the registry's ``encodes_turns``), once it loaded;
        ``model_unavailable`` without one."""
        slot = next((s for s in self.chain.slots if registry.capabilities(s.name).encodes_turns), None)
        if slot is not None:
            await slot.loaded.wait()
        if slot is None or slot.state != EngineState.READY:
            why = slot.reason if slot else "not configured"
            name = registry.label(slot.name) if slot else \
                next((s.label for s in registry.specs() if s.capabilities.encodes_turns), "the turn encoder")
            raise Refusal(ErrorCode.MODEL_UNAVAILABLE, f"Turns are kept as {name}'s audio codes, and {name} is not "
                                                       f"available here: {why}")
        return slot
