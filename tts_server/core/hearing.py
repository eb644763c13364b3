"""The other side's turns while they speak: streamed (``turn_start``, 16-bit PCM, ``turn_end``) or heard hands-free
(voice activity detection ends each utterance at a pause).

A ``Conversation`` holds one ``Hearing``.  Every frame is paced and every open
turn timed on the event loop (``turn_guard``), before any work is queued for
it, so a flood costs the shared turn-encoding thread nothing; the work itself
(resampling, the VAD, Mimi's streaming encoder) runs on that thread in the
client's turn.  At a pause in a hands-free utterance its transcript is begun at
once, so that ``turn_saved`` follows the end of speech by the codec's last frame
rather than by a whole transcription.  A turn that ends is handed to ``keep``
(the conversation's history and session); when ``turn_start`` asked for answers
the assistant then answers it, which costs a request of the client's rate.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Awaitable, Callable

from ..engines.base import ContextTurn
from ..engines.errors import ErrorCode, Refusal
from ..engines.request import SynthesisRequest, new_request_id
from .events import Failed, SpeechEnded, SpeechStarted, failed
from .fair import Dropped
from .listening import Heard, Listener
from .peer import Peer
from .replies import rate_limited
from .security import RateLimiter
from .turn_guard import TurnGuard
from .turns import TRANSCRIPT_RATE, StreamedTurn

if TYPE_CHECKING:
    from .service import Service


class Hearing:
    """One client's open turn or listening, its pace, its speculative transcript, and whether to answer."""

    def __init__(self, service: Service, peer: Peer, rate: RateLimiter,
                 keep: Callable[[ContextTurn], Awaitable[None]],
                 respond: Callable[[SynthesisRequest], Awaitable[None]]) -> None:
        self.service, self.peer, self.rate = service, peer, rate
        self._keep, self._respond = keep, respond
        self._streaming: StreamedTurn | None = None  # a turn streamed while its speaker talks
        self._listener: Listener | None = None  # hands-free turns (turn_start with vad)
        self._guess: asyncio.Future | None = None  # a hands-free utterance's transcript, begun at its pause
        self._guard = TurnGuard(service.turns.audio_pace(), service.turns.turn_timeout)
        # turn_start's respond: the request of the answer to each saved turn, given its id; it outlives the turn
        self.answer: Callable[[str], SynthesisRequest] | None = None

    @property
    def open(self) -> bool:
        """Whether binary frames are a turn's audio now: a turn is streamed, or the server listens."""
        return self._streaming is not None or self._listener is not None

    async def start(self, speaker: int, sample_rate: int, vad: bool,
                    answer: Callable[[str], SynthesisRequest] | None) -> None:
        self.close()  # a turn left open is dropped for the new one
        if vad:
            self._listener = await self.service.turns.listener(speaker, sample_rate)
        else:
            self._streaming = await self.service.turns.stream_turn(speaker, sample_rate)
            self._guard.open(lambda turn=self._streaming: self._overstayed(turn))
        self.answer = answer

    def close(self) -> None:
        """Listening ends and an open turn is dropped (their buffers go now), a speculative transcript with them."""
        self._streaming = self._listener = None
        self._drop_guess()
        self._guard.close()

    async def audio(self, pcm: bytes) -> None:
        """A frame of 16-bit PCM for the open turn or the listening."""
        self._paced(pcm)
        if self._listener is not None:
            return await self._listen(self._listener, pcm)
        try:
            await self._encode(self._streaming.feed, pcm)
        except Refusal:
            self._streaming = None
            self._guard.close()
            raise

    async def _listen(self, listener: Listener, pcm: bytes) -> None:
        """Hands-free audio: the VAD's events it completes, each told to the client and acted on."""
        for event, turn in await self._encode(listener.feed, pcm):
            if self._listener is not listener:  # dropped meanwhile (a new turn_start, the turn timeout)
                return
            if event in (Heard.DROPPED, Heard.SPEECH_END):
                self._guard.close()
            if event == Heard.DROPPED:
                await self.peer.send(Failed(ErrorCode.INVALID_REQUEST, "An utterance longer than a turn may last "
                                                                       "was dropped; listening goes on"))
            elif event == Heard.SPEECH_START:
                self._guard.open(lambda: self._overstayed(listener))
                await self.peer.send(SpeechStarted())
            elif event == Heard.PAUSE:  # it may be over: transcribe what was said so far, while the pause lasts
                self._drop_guess()  # (one still waiting from an earlier pause is stale)
                heard = await self._encode(turn.so_far)
                self._guess = asyncio.ensure_future(self._transcribe_quietly(heard))
            elif event == Heard.RESUME:
                self._drop_guess()  # it was not over
            else:  # SPEECH_END
                guess, self._guess = self._guess, None
                await self.peer.send(SpeechEnded())
                await self._close_turn(turn, None, guess)

    async def end(self, text: str | None) -> None:
        """``turn_end``: the streamed turn is kept; hands-free listening ends, an utterance in progress kept."""
        listener, turn = self._listener, self._streaming
        self.close()
        if listener is not None:
            if listener.turn is not None:
                await self._close_turn(listener.turn, text)
            return
        if turn is None:
            raise Refusal(ErrorCode.INVALID_REQUEST, "'turn_end' without an open turn: send 'turn_start' and the "
                                                     "audio first")
        await self._close_turn(turn, text)

    async def _encode(self, fn, *args):
        """``fn(*args)`` on the turn-encoding thread, in this client's turn (``fair.Dropped`` once it has gone)."""
        if self.peer.gone():
            raise Dropped("its connection closed")
        return await self.service.turns.run(self.peer.key, fn, *args)

    def _paced(self, pcm: bytes) -> None:
        """Refuse a frame beyond the client's pace before any work is queued for it; its turn (or the listening)
        is dropped."""
        try:
            self._guard.check(len(pcm), (self._listener or self._streaming).sample_rate,
                              "listening ended (an utterance in progress was dropped): send 'turn_start' to listen "
                              "again" if self._listener else "the streamed turn was dropped")
        except Refusal:
            self.close()
            raise

    def _overstayed(self, opened: StreamedTurn | Listener) -> None:
        """The turn timeout of a turn or utterance that is still open: it is dropped (hands-free, with the
        listening), and the client told."""
        if self._streaming is opened:
            self._streaming, what, after = None, "A streamed turn", "it was dropped"
        elif self._listener is opened and opened.turn is not None:
            self._listener, what, after = None, "An utterance", "it was dropped and listening ended: send " \
                                                                "'turn_start' to listen again"
            self._drop_guess()
        else:
            return
        self.service.background(self._tell(self._guard.overstayed_reply(what, after)))

    async def _tell(self, reply: Failed) -> None:
        """A reply nothing waits for (a timer's): lost without complaint if the client has gone."""
        try:
            await self.peer.send(reply)
        except Exception:
            pass

    async def _close_turn(self, turn: StreamedTurn, text: str | None, guess: asyncio.Future | None = None) -> None:
        """End a streamed turn, transcribe it unless its text was given (or its pause already was: ``guess``), keep
        it; then answer it if asked to."""
        audio = await self._encode(turn.end)
        text = (text or "").strip() or (await guess if guess is not None else None) or \
            await self.service.speech.transcript(audio, TRANSCRIPT_RATE, connection=self.peer.key)
        await self._keep(await self._encode(turn.finish, text))
        if self.answer is None:
            return
        if not self.rate.allow():  # an answer costs what a 'respond' does; the turn is kept all the same
            return await self.peer.send(failed(rate_limited(self.service.limits.rate_limit)))
        await self._respond(self.answer(new_request_id()))

    async def _transcribe_quietly(self, audio) -> str | None:
        """A transcript, or None where ``transcript`` would refuse (the turn's end asks again, and says why)."""
        try:
            return await self.service.speech.transcript(audio, TRANSCRIPT_RATE, connection=self.peer.key)
        except Exception:
            return None

    def _drop_guess(self) -> None:
        """At most one speculative transcription per listener: a stale one (the speaker went on, a newer pause came,
        listening ended) is dropped while it waits for the thread; one already running cannot be stopped, and its
        text is never used."""
        guess, self._guess = self._guess, None
        if guess is not None:
            guess.cancel()
