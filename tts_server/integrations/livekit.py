"""CSM as a LiveKit Agents TTS that keeps the conversation: ``TTS(url=..., session=None, speaker=0)``.

``synthesize()`` and ``stream()`` speak through one connection to this server
(``wire.CSMClient``) bound to a session, so every reply is spoken with the
conversation's audio before it.  ``stream()`` sends text as the LLM writes it
(the server's ``text_stream``: the whole text's sentences, one decoder), and
each ``flush()`` speaks what is pending.  Word times (the server's ``words``)
are pushed as LiveKit's aligned transcript.  A stream closed before its end
(an interruption) cancels the reply with what was played, so the session keeps
only that.  ``user_turn`` adds the user's audio of a turn with its transcript
(LiveKit gives the audio to ``Agent.stt_node`` and the transcript to
``on_user_turn_completed``: examples/livekit_agent.py joins them).  Needs
``pip install ".[livekit]"``; the server never imports this module.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Iterable

from livekit import rtc
from livekit.agents import APIConnectionError, APIConnectOptions, APIStatusError, tts
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, TimedString

from .wire import CSMClient, Reply, ServerError, speaker_of


class TTS(tts.TTS):
    """LiveKit TTS on this server (see the module docstring); ``options``: any field of a ``synthesize``
    (``emotion``, ``temperature``, ``seed``, ``speed``, ...; docs/protocol.md)."""

    def __init__(self, *, url: str, api_key: str | None = None, session: str | None = None, speaker: int | str = 0,
                 sample_rate: int = 24000, options: dict[str, Any] | None = None) -> None:
        super().__init__(capabilities=tts.TTSCapabilities(streaming=True, aligned_transcript=True),
                         sample_rate=sample_rate, num_channels=1)
        self.client = CSMClient(url, api_key, session)
        self.speaker = speaker_of(speaker)  # an id, or an OpenAI voice name ("alloy" is 0)
        self.options = {"timestamps": True, **(options or {})}
        self.cuts: list[dict] = []  # each stream closed before its end: what was played, what the session kept

    @property
    def model(self) -> str:
        return "csm-1b"

    @property
    def provider(self) -> str:
        return "csm-tts-server"

    @property
    def session_id(self) -> str | None:
        return self.client.session

    def synthesize(self, text: str, *,
                   conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> "ChunkedStream":
        return ChunkedStream(tts=self, input_text=text, conn_options=conn_options)

    def stream(self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> "SynthesizeStream":
        return SynthesizeStream(tts=self, conn_options=conn_options)

    async def user_turn(self, frames: Iterable[rtc.AudioFrame], text: str | None, speaker: int = 1) -> dict:
        """The user's audio of one turn (mono 16-bit frames) and its transcript, into the conversation: the
        server's ``turn_saved`` reply."""
        frames = list(frames)
        if not frames:
            raise ValueError("a user turn needs audio")
        try:
            await self.client.start_turn(speaker, frames[0].sample_rate)
            for frame in frames:
                await self.client.audio(bytes(frame.data))
            return await self.client.end_turn(text)
        except ServerError as exc:
            raise APIStatusError(str(exc), status_code=-1, body=exc.code) from None

    async def aclose(self) -> None:
        await self.client.close()


async def _relay(reply: Reply, emitter: tts.AudioEmitter, rate: int, played: dict) -> None:
    """The reply's audio (at ``rate``: resampled if the server speaks at another) and words into LiveKit's emitter
    until its end.  ``played`` keeps when its first audio left and how many bytes did (what an interruption leaves
    played)."""
    resampler: rtc.AudioResampler | None = None
    try:
        async for item in reply:
            if isinstance(item, bytes):
                if reply.sample_rate != rate:
                    resampler = resampler or rtc.AudioResampler(reply.sample_rate, rate, num_channels=1)
                    item = b"".join(bytes(f.data) for f in resampler.push(bytearray(item)))
                played.setdefault("started", time.monotonic())
                played["bytes"] = played.get("bytes", 0) + len(item)
                emitter.push(item)
            elif item["status"] == "words":
                emitter.push_timed_transcript([TimedString(f"{w['word']} ", start_time=w["start_s"],
                                                           end_time=w["end_s"]) for w in item["words"]])
            elif item["status"] == "error":
                raise APIStatusError(f"CSM server: {item.get('message')}", status_code=-1,
                                     body=item.get("code"), retryable=False)
    except ServerError as exc:  # the connection dropped: LiveKit may retry (the next request reconnects)
        raise APIConnectionError(f"CSM server: {exc}") from None
    if resampler is not None:
        for frame in resampler.flush():
            emitter.push(bytes(frame.data))


class ChunkedStream(tts.ChunkedStream):
    """One whole text: sent as a streamed text that ends at once (the same sentences and audio as the text whole)."""

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        client: CSMClient = self._tts.client
        request_id = client.new_id("lk")
        output_emitter.initialize(request_id=request_id, sample_rate=self._tts.sample_rate, num_channels=1,
                                  mime_type="audio/pcm")
        try:
            reply = await client.speak(request_id, self._input_text, speaker=self._tts.speaker,
                                       **self._tts.options)
            await client.end(request_id)
        except (OSError, ServerError) as exc:
            raise APIConnectionError(f"CSM server: {exc}") from None
        await _relay(reply, output_emitter, self._tts.sample_rate, {})
        output_emitter.flush()


class SynthesizeStream(tts.SynthesizeStream):
    """Text pushed as the LLM writes it; each ``flush()`` speaks what is pending (one reply, one decoder)."""

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        client: CSMClient = self._tts.client
        request_id = client.new_id("lk")
        output_emitter.initialize(request_id=request_id, sample_rate=self._tts.sample_rate, num_channels=1,
                                  mime_type="audio/pcm", stream=True)
        output_emitter.start_segment(segment_id=request_id)
        played: dict = {}
        try:
            reply = await client.speak(request_id, speaker=self._tts.speaker, **self._tts.options)
        except (OSError, ServerError) as exc:
            raise APIConnectionError(f"CSM server: {exc}") from None
        relay = asyncio.create_task(_relay(reply, output_emitter, self._tts.sample_rate, played))
        try:
            async for data in self._input_ch:
                flush = isinstance(data, self._FlushSentinel)
                await client.text(request_id, "" if flush else data, flush=flush)
            await client.end(request_id)
            await relay
            output_emitter.end_segment()
        finally:
            if not reply.done:  # closed before its end: an interruption
                relay.cancel()
                heard_s = min(played.get("bytes", 0) / 2 / self._tts.sample_rate,
                              time.monotonic() - played.get("started", time.monotonic()))
                asyncio.get_running_loop().create_task(self._cancel(client, request_id, heard_s * 1000))

    async def _cancel(self, client: CSMClient, request_id: str, played_ms: float) -> None:
        try:
            kept = await client.cancel(request_id, played_ms)
        except (OSError, ServerError):
            return
        self._tts.cuts.append({"request_id": request_id, "played_ms": played_ms, "kept_s": kept})
