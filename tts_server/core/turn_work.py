"""The other side's audio: turns encoded to the engine's codes, streamed turns, and hands-free listening.

Turns are kept as the codes of the chain's engine that encodes them (CSM's Mimi
codes), so a server without such an engine cannot take them.  Encoding, voice
activity detection, the turn detector and Mimi's streaming encoder run on one thread for the whole
server, shared fairly by the connections (``fair.FairThread``), never on the
event loop.  Streamed audio is paced per connection (``pacing.AudioPace``) and a
turn may stay open ``turn_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
from enum import Enum
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


class TurnDetector(str, Enum):
    """What ends a hands-free turn (``--turn-detector``)."""

    SMART_TURN = "smart-turn"  # a short silence proposes the end, Smart Turn hears whether the utterance is complete
    VAD = "vad"  # a fixed silence


DEFAULT_SILENCE_MS = {TurnDetector.SMART_TURN: 200, TurnDetector.VAD: 600}


class TurnEncoding:
    def __init__(self, chain: Chain, admitted: Callable[[Hashable], bool],
                 on_dropped: Callable[[int], None] = lambda count: None, vad_silence_ms: float | None = None,
                 vad_pause_ms: float = 200, audio_burst_seconds: float = AUDIO_BURST_SECONDS,
                 audio_speed: float = AUDIO_SPEED, turn_timeout: float = TURN_TIMEOUT,
                 turn_detector: TurnDetector = TurnDetector.VAD, turn_max_silence_ms: float = 3000) -> None:
        self.chain = chain
        self._admitted = admitted
        self.thread = FairThread("turn-encoder", TURN_WORK_WAITING, on_dropped)
        # hands-free: what ends an utterance.  The VAD alone: a silence of vad_silence_ms (its transcription starts
        # at a pause of vad_pause_ms).  Smart Turn: a silence of vad_silence_ms proposes the end (and starts the
        # transcription), the model confirms it; turn_max_silence_ms of silence ends it anyway.
        self.turn_detector = TurnDetector(turn_detector)
        self.vad_silence_ms = vad_silence_ms if vad_silence_ms is not None else \
            DEFAULT_SILENCE_MS[self.turn_detector]
        self.vad_pause_ms, self.turn_max_silence_ms = vad_pause_ms, max(turn_max_silence_ms, self.vad_silence_ms)
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
        open_turn = lambda: StreamedTurn(speaker, sample_rate, slot.engine.stream_encoder())  # noqa: E731
        if self.turn_detector == TurnDetector.VAD:
            return Listener(sample_rate, SpeechDetector(self.vad_silence_ms, pause_ms=self.vad_pause_ms), open_turn)
        from ..engines.turn_detector import smart_turn

        try:
            model = await asyncio.to_thread(smart_turn)
        except Exception as exc:
            raise Refusal(ErrorCode.MODEL_UNAVAILABLE, f"The turn detector (Smart Turn) is unavailable: {exc}; start "
                                                       "the server with --turn-detector vad") from None
        detector = SpeechDetector(self.turn_max_silence_ms, pause_ms=self.vad_silence_ms)
        return Listener(sample_rate, detector, open_turn, complete=model.complete)

    def describe(self) -> dict[str, Any]:
        """For ``/v1/info``: what ends a hands-free turn here."""
        return {"turn_detector": self.turn_detector.value, "vad_silence_ms": self.vad_silence_ms,
                "turn_max_silence_ms": self.turn_max_silence_ms if self.turn_detector == TurnDetector.SMART_TURN
                else self.vad_silence_ms}

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
