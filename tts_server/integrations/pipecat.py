"""CSM in a Pipecat pipeline: a TTS service that keeps the conversation, and the user's turns in it.

``CSMTTSService`` speaks this server's WebSocket (``wire.CSMClient``): each LLM
response is one streamed text (``text_stream``) in the service's session, so
CSM speaks every sentence with the conversation's audio before it, through one
decoder.  Audio arrives at the pipeline's rate; word times (the server's
``words``) go into Pipecat's context; an interruption cancels the reply with
``played_ms``, so the session keeps only what was played.  ``CSMUserTurns``
streams the user's audio of each turn into the same conversation with the
transcript Pipecat's STT wrote, so the next answer is spoken in the context of
the user's voice.  Needs ``pip install ".[pipecat]"``; the server never
imports this module.
"""

from __future__ import annotations

import asyncio
import collections
import time

import numpy as np
import soxr
from typing import Any, AsyncGenerator

from pipecat.frames.frames import (ErrorFrame, Frame, InputAudioRawFrame, StartFrame, TranscriptionFrame,
                                   TTSAudioRawFrame, TTSStoppedFrame, UserStartedSpeakingFrame,
                                   UserStoppedSpeakingFrame)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import WebsocketTTSService

from .wire import CSMClient, Reply, ServerError, speaker_of

TRANSCRIPT_WAIT_S = 2.0  # how long a user turn waits after the user stopped for the STT's transcript
PRE_ROLL_S = 0.5  # audio kept from before "user started speaking" (a VAD says so ~0.2 s into the speech)


class CSMTTSService(WebsocketTTSService):
    """Pipecat TTS on this server.  ``session``: resume that session (else a new one, ``session_id`` once
    connected); ``speaker``: CSM's speaker id for the assistant, or an OpenAI voice name (``"alloy"`` is 0, as the
    server's OpenAI API numbers them); ``options``: any field of a ``synthesize``
    (``emotion``, ``temperature``, ``top_k``, ``seed``, ``speed``, ``language``, ...; docs/protocol.md)."""

    def __init__(self, *, url: str, api_key: str | None = None, session: str | None = None, speaker: int | str = 0,
                 sample_rate: int | None = None, options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(push_text_frames=False, push_start_frame=True, pause_frame_processing=False,
                         sample_rate=sample_rate, reuse_context_id_within_turn=True,
                         settings=TTSSettings(model="csm-1b", voice=str(speaker_of(speaker)), language=None),
                         **kwargs)
        self.client = CSMClient(url, api_key, session)
        self.options = {"timestamps": True, "progress": True, **(options or {})}
        self._open: set[str] = set()  # contexts whose streamed text is open on the server
        self._pumps: dict[str, asyncio.Task] = {}
        self._played: dict[str, tuple[float, int]] = {}  # context -> (when its first audio left, bytes pushed)
        self.cuts: list[dict] = []  # each interruption: its context, what was played, what the session kept
        self.finished = 0  # replies received to their end (audio, words and terminal reply)

    @property
    def session_id(self) -> str | None:
        return self.client.session

    @property
    def speaker(self) -> int:
        """The voice setting as CSM's speaker id (a ``TTSUpdateSettingsFrame`` may change it: an id or an OpenAI
        voice name; ``ValueError`` for another)."""
        return speaker_of(self._settings.voice)

    def can_generate_metrics(self) -> bool:
        return True

    # -- the connection (WebsocketService's hooks) ------------------------------------------------------------------
    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self._connect()

    async def _connect(self) -> None:
        await super()._connect()
        await self._connect_websocket()

    async def _disconnect(self) -> None:
        await super()._disconnect()
        await self._disconnect_websocket()

    async def _connect_websocket(self) -> None:
        try:
            await self.client.connect()  # resumes the session after a reconnection
            await self._call_event_handler("on_connected")
        except (OSError, ServerError) as exc:
            await self.push_error(error_msg=f"CSM server unreachable: {exc}", exception=exc)
            await self._call_event_handler("on_connection_error", str(exc))

    async def _disconnect_websocket(self) -> None:
        for task in list(self._pumps.values()):
            task.cancel()
        self._open.clear()
        await self.client.close()
        await self._call_event_handler("on_disconnected")

    async def _receive_messages(self) -> None:  # the client reads its own socket (wire.CSMClient)
        await asyncio.Event().wait()

    # -- speaking -------------------------------------------------------------------------------------------------
    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """The LLM's next text for this response's context: the first opens a streamed text, the rest are its
        pieces.  Sentence-aggregated text is flushed (Pipecat found the sentence end); streamed tokens are left to
        the server's sentence rule, which gives the whole text's audio."""
        try:
            if context_id not in self._open:
                self._open.add(context_id)
                reply = await self.client.speak(context_id, speaker=self.speaker, **self.options)
                self._pumps[context_id] = asyncio.create_task(self._pump(context_id, reply))
            await self.client.text(context_id, text, flush=not self._is_streaming_tokens)
            await self.start_tts_usage_metrics(text)
        except (OSError, ServerError, ValueError) as exc:
            self._open.discard(context_id)
            yield ErrorFrame(error=f"CSM server: {exc}")
            return
        yield None

    async def flush_audio(self, context_id: str | None = None) -> None:
        """The LLM response ended: its streamed text ends, the rest is spoken."""
        context_id = context_id or self.get_active_audio_context_id()
        if context_id in self._open:
            self._open.discard(context_id)
            await self.client.end(context_id)

    async def _pump(self, context_id: str, reply: Reply) -> None:
        """The reply's audio (resampled to the pipeline's rate, one stream per reply: nothing of its tail is lost)
        and words into the context's queue, in order, then its end."""
        resampler: soxr.ResampleStream | None = None
        try:
            async for item in reply:
                if isinstance(item, bytes):
                    if reply.sample_rate != self.sample_rate:
                        resampler = resampler or soxr.ResampleStream(reply.sample_rate, self.sample_rate, 1, "int16")
                        item = resampler.resample_chunk(np.frombuffer(item, np.int16)).tobytes()
                    await self._audio(context_id, item)
                elif item["status"] == "words":
                    await self.add_word_timestamps([(w["word"], w["start_s"]) for w in item["words"]], context_id)
                elif item["status"] == "error":
                    await self.push_error(error_msg=f"CSM server: {item.get('message')} ({item.get('code')})")
            if resampler is not None:
                await self._audio(context_id, resampler.resample_chunk(np.zeros(0, np.int16), last=True).tobytes())
        except ServerError as exc:
            await self.push_error(error_msg=f"CSM server: {exc}")
        finally:
            self.finished += 1
            self._pumps.pop(context_id, None)
            self._open.discard(context_id)
            if self.audio_context_available(context_id):
                await self.append_to_audio_context(context_id, TTSStoppedFrame(context_id=context_id))
                await self.remove_audio_context(context_id)

    async def _audio(self, context_id: str, audio: bytes) -> None:
        if audio:
            await self.append_to_audio_context(context_id, TTSAudioRawFrame(
                audio=audio, sample_rate=self.sample_rate, num_channels=1, context_id=context_id))

    # -- interruptions: the session keeps what was played -------------------------------------------------------
    async def push_frame(self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM) -> None:
        if isinstance(frame, TTSAudioRawFrame) and frame.context_id:
            started, pushed = self._played.get(frame.context_id, (time.monotonic(), 0))
            self._played[frame.context_id] = started, pushed + len(frame.audio)
        await super().push_frame(frame, direction)

    def played_ms(self, context_id: str) -> float:
        """What the listener heard of a context: the audio pushed downstream, but no more than the time since its
        first frame left (an output transport plays in real time)."""
        started, pushed = self._played.get(context_id, (time.monotonic(), 0))
        pushed_ms = pushed / 2 / self.sample_rate * 1000
        return max(0.0, min(pushed_ms, (time.monotonic() - started) * 1000))

    async def on_audio_context_interrupted(self, context_id: str) -> None:
        """Cancel the reply; the server cuts the session's turn to what was played (its ``truncated`` reply)."""
        await self.stop_all_metrics()
        self._open.discard(context_id)
        played = self.played_ms(context_id)
        self._played.pop(context_id, None)
        if self.client.ws is not None:
            self.create_task(self._cancel(context_id, played), f"csm-cancel-{context_id}")
        await super().on_audio_context_interrupted(context_id)

    async def _cancel(self, context_id: str, played_ms: float) -> None:
        try:
            kept = await self.client.cancel(context_id, played_ms)
        except (OSError, ServerError):
            return  # the connection is gone: the next request reconnects; the reply ended with it
        self.cuts.append({"context_id": context_id, "played_ms": played_ms, "kept_s": kept})

    async def on_audio_context_completed(self, context_id: str) -> None:
        self._played.pop(context_id, None)
        await super().on_audio_context_completed(context_id)


class CSMUserTurns(FrameProcessor):
    """Streams the user's audio of each turn (user started .. stopped speaking, with ``PRE_ROLL_S`` before) into
    the conversation of ``tts`` (its connection and session) as a turn of ``speaker``, with the transcript Pipecat's
    STT wrote.  Place it after the STT service (which passes the audio on; the transcript only flows downstream
    from it) and before the user aggregator (which broadcasts user started/stopped speaking both ways); frames pass
    unchanged."""

    def __init__(self, tts: CSMTTSService, speaker: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tts, self.speaker = tts, speaker
        self.saved: list[dict] = []  # the server's turn_saved replies, newest last
        self._speaking = False
        self._rate: int | None = None
        self._transcript: list[str] = []
        self._ending: asyncio.Task | None = None
        self._heard = asyncio.Event()
        self._recent: collections.deque[InputAudioRawFrame] = collections.deque()  # the pre-roll

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, UserStartedSpeakingFrame):
            await self._start()
        elif isinstance(frame, InputAudioRawFrame) and self._speaking:
            await self._audio(frame)
        elif isinstance(frame, InputAudioRawFrame):
            self._keep_recent(frame)
        elif isinstance(frame, UserStoppedSpeakingFrame) and self._speaking:
            self._speaking = False
            self._ending = self.create_task(self._end(), "csm-user-turn-end")
        elif isinstance(frame, TranscriptionFrame) and frame.text.strip():
            self._transcript.append(frame.text.strip())
            self._heard.set()
        await self.push_frame(frame, direction)

    def _keep_recent(self, frame: InputAudioRawFrame) -> None:
        self._recent.append(frame)
        while sum(len(f.audio) for f in self._recent) / 2 / frame.sample_rate > PRE_ROLL_S:
            self._recent.popleft()

    async def _start(self) -> None:
        if self._ending is not None:
            await self._ending  # the previous turn is saved first: turns stay in order
        self._speaking, self._rate, self._transcript = True, None, []
        self._heard.clear()
        recent, self._recent = list(self._recent), collections.deque()
        for frame in recent:
            await self._audio(frame)

    async def _audio(self, frame: InputAudioRawFrame) -> None:
        try:
            if self._rate is None:
                self._rate = frame.sample_rate
                await self.tts.client.start_turn(self.speaker, frame.sample_rate)
            await self.tts.client.audio(frame.audio)
        except (OSError, ServerError) as exc:
            self._speaking = False
            await self.push_error(error_msg=f"CSM server: the user's turn was not sent: {exc}")

    async def _end(self) -> None:
        """Wait briefly for the STT's transcript (it often comes just after the user stopped), then end the turn."""
        if self._rate is None:
            return
        if not self._transcript:
            try:
                await asyncio.wait_for(self._heard.wait(), TRANSCRIPT_WAIT_S)
            except asyncio.TimeoutError:
                pass
        try:
            self.saved.append(await self.tts.client.end_turn(" ".join(self._transcript) or None))
        except (OSError, ServerError) as exc:
            await self.push_error(error_msg=f"CSM server: the user's turn was not saved: {exc}")
