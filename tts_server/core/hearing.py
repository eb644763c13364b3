"""The other side's turns while they speak: streamed (``turn_start``, 16-bit PCM, ``turn_end``) or heard hands-free
(voice activity detection ends each utterance at a pause).

A ``Conversation`` holds one ``Hearing``.  Every frame is paced and every open
turn timed on the event loop (``turn_guard``), before any work is queued for
it, so a flood costs the shared turn-encoding thread nothing; the work itself
(resampling, the VAD, Mimi's streaming encoder) runs on that thread in the
client's turn.  At a pause in a hands-free utterance its transcript is begun at
once, so that ``turn_saved`` follows the end of speech by the codec's last frame
rather than by a whole transcription.  Where a turn detector proposes the end,
the transcript so far has the last word: the utterance ends once it reads
finished, unless the speaker went on meanwhile (the audio keeps being heard while
it is made; a frame's work and a turn's ending never interleave).  A turn that
ends is handed to ``keep`` (the conversation's history and session); when
``turn_start`` asked for answers the assistant then answers it, which costs a
request of the client's rate.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Awaitable, Callable

from ..audio.text import reads_unfinished
from ..engines.base import ContextTurn
from ..engines.errors import ErrorCode, Refusal
from ..engines.request import SynthesisRequest, new_request_id
from .events import Failed, SpeechEnded, SpeechStarted, failed
from .fair import Dropped
from .listening import Heard, Listener
from .peer import Peer
from .pieces import Pieces
from .preempt import Preemptive
from .replies import rate_limited
from .security import RateLimiter
from .speech import no_speech
from .turn_guard import TurnGuard
from .turns import TRANSCRIPT_RATE, StreamedTurn

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger(__name__)


class Hearing:
    """One client's open turn or listening, its pace, its speculative transcript, and whether to answer."""

    def __init__(self, service: Service, peer: Peer, rate: RateLimiter,
                 keep: Callable[[ContextTurn], Awaitable[None]],
                 respond: Callable[[SynthesisRequest, Preemptive | None], Awaitable[None]],
                 prefetch: Callable[[int, str, int], Awaitable[Preemptive | None]]) -> None:
        self.service, self.peer, self.rate = service, peer, rate
        self._keep, self._respond, self._prefetch = keep, respond, prefetch
        self._streaming: StreamedTurn | None = None  # a turn streamed while its speaker talks
        self._listener: Listener | None = None  # hands-free turns (turn_start with vad)
        # a hands-free utterance transcribed as it is spoken: the text of each piece up to a pause, in order
        self._pieces = Pieces(self._transcribe_quietly)
        self._preempting: asyncio.Task | None = None  # the answer begun at a proposed end (``core.preempt``)
        self._deciding: asyncio.Task | None = None  # a proposed end, waiting for its transcript's verdict
        self._ending: asyncio.Task | None = None  # one that stood: ending its turn (held here, never dropped)
        self._one_at_a_time = asyncio.Lock()  # a frame's events, or the ending of a proposed end's utterance
        self.language: str | None = service.speech.language  # what the speaker speaks, once known
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

    async def settle(self) -> None:
        """Before a message that changes the conversation (``turn_start``, ``reset``, ``session``): an utterance
        whose end is being decided, whose audio came first, is kept (or goes on) first."""
        for task in (self._deciding, self._ending):
            if task is not None and not task.done():
                await asyncio.wait({task})

    def close(self) -> None:
        """Listening ends and an open turn is dropped (their buffers go now), its transcription and a preemptive
        answer with them."""
        self._streaming = self._listener = None
        self._drop_guess()
        self._guard.close()

    async def audio(self, pcm: bytes) -> None:
        """A frame of 16-bit PCM for the open turn or the listening."""
        self._paced(pcm)
        if self._listener is not None:
            listener = self._listener
            async with self._one_at_a_time:  # (an utterance being ended at its proposed end is ended first)
                if self._listener is listener:
                    await self._listen(listener, pcm)
            return
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
                self._deciding = _cancelled(self._deciding)
            if event == Heard.DROPPED:
                await self.peer.send(Failed(ErrorCode.INVALID_REQUEST, "An utterance longer than a turn may last "
                                                                       "was dropped; listening goes on"))
            elif event == Heard.SPEECH_START:
                self._drop_guess()
                self._guard.open(lambda: self._overstayed(listener))
                await self.peer.send(SpeechStarted())
            elif event == Heard.PAUSE:  # it may be over: transcribe the piece said since the last pause, and answer
                self._pieces.add(await self._encode(turn.so_far))
                self._preempt()
            elif event == Heard.RESUME:
                self._pieces.resumed()  # the piece stands; what comes next is the next one
                self._preempting = _dropped(self._preempting)  # it was not over
                self._deciding = _cancelled(self._deciding)
            elif event == Heard.PROPOSED_END:  # decided once its words are read; the audio is heard meanwhile
                self._deciding = _cancelled(self._deciding)
                self._deciding = asyncio.ensure_future(self._decide(listener, turn))
            else:  # SPEECH_END
                await self._ended(turn)

    async def _ended(self, turn: StreamedTurn) -> None:
        """The utterance in progress has ended: ``speech_end``, and the turn kept (and answered)."""
        self._guard.close()
        pieces, self._pieces = self._pieces, Pieces(self._transcribe_quietly)
        await self.peer.send(SpeechEnded())
        await self._close_turn(turn, None, pieces)

    async def end(self, text: str | None) -> None:
        """``turn_end``: the streamed turn is kept; hands-free listening ends, an utterance in progress kept."""
        listener, turn = self._listener, self._streaming
        self.close()
        if listener is not None:
            async with self._one_at_a_time:  # (after an utterance already being ended at its proposed end)
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

    async def _close_turn(self, turn: StreamedTurn, text: str | None, pieces: Pieces | None = None) -> None:
        """End a streamed turn, transcribe it unless its text was given (a hands-free one: the pieces transcribed at
        its pauses, and the rest), keep it; then answer it if asked to (with the answer begun at its proposed end
        when that was on the same transcript)."""
        audio = await self._encode(turn.end)
        text = (text or "").strip() or (await pieces.text(audio) if pieces is not None else None) or \
            await self.transcript(audio)
        await self._keep(await self._encode(turn.finish, text))
        begun = await self._begun()
        if self.answer is None or not self.rate.allow():  # an answer costs what a 'respond' does
            if begun is not None:
                begun.cancel()
            if self.answer is not None:  # the turn is kept all the same
                await self.peer.send(failed(rate_limited(self.service.limits.rate_limit)))
            return
        await self._respond(self.answer(new_request_id()), begun)

    async def _begun(self) -> Preemptive | None:
        """The answer begun at the utterance's last proposed end, once its beginning is settled (None if there was
        none, or it could not begin)."""
        preempting, self._preempting = self._preempting, None
        if preempting is None:
            return None
        await asyncio.wait({preempting})
        return None if preempting.cancelled() or preempting.exception() is not None else preempting.result()

    async def _decide(self, listener: Listener, turn: StreamedTurn) -> None:
        """The turn detector heard the utterance end at this pause; its transcript so far has the last word: if it
        reads cut off ("...to the shop and"), the silence goes on (speech resumes it, the full silence ends it).
        Otherwise it ends, unless the speaker went on while the transcript was made (a resume drops this)."""
        text = await self._pieces.so_far()
        if text is not None and reads_unfinished(text, self.language):
            return
        async with self._one_at_a_time:
            if self._deciding is not asyncio.current_task():
                return  # dropped while it waited (a resume, the full silence, listening ended)
            self._deciding, self._ending = None, asyncio.current_task()  # the turn's end now, as a SPEECH_END's
            try:
                if self._listener is listener and await self._encode(listener.finish, turn):
                    await self._ended(turn)
            except Refusal as exc:  # (what a frame's handling would have been told)
                await self._tell(failed(exc))
            except Dropped:
                pass
            except Exception:
                if self.peer.gone():  # it left while its turn was kept: nothing to tell
                    return
                log.exception("internal error while ending a turn at its proposed end")
                await self._tell(Failed(ErrorCode.INTERNAL_ERROR, "Internal server error"))

    def _preempt(self) -> None:
        """At a proposed end, with answers asked for: once the pieces so far are transcribed, begin the answer to
        them (``core.preempt``); a resume or another pause drops it."""
        self._preempting = _dropped(self._preempting)
        if self.answer is None or self.service.chat is None or not self.rate.available():
            return  # (an answer the rate limit would refuse is not begun: the chat model is not asked for nothing)
        pieces, speaker = self._pieces, self._listener.turn.speaker if self._listener and self._listener.turn else 0

        async def begin() -> Preemptive | None:
            text = await pieces.so_far()
            if not text or pieces.speaking:  # (the speaker went on meanwhile: this is dropped anyway)
                return None
            return await self._prefetch(speaker, text, self.answer("preempt").speaker)
        self._preempting = asyncio.ensure_future(begin())

    async def transcript(self, audio, rate: int = TRANSCRIPT_RATE, quietly: bool = False) -> str | None:
        """What was said in ``audio``, in this speaker's language once known (learnt from the first turn): a whole
        turn's transcript, refused if nothing was said; ``quietly`` (a piece of an utterance): "" if nothing was
        said in it, None where it would be refused (the turn's end then transcribes it whole, and says why)."""
        try:
            text, self.language = await self.service.speech.hear(audio, rate, self.peer.key, self.language)
        except Exception:
            if quietly:
                return None
            raise
        if not text and not quietly:
            raise no_speech()
        return text

    async def _transcribe_quietly(self, audio) -> str | None:
        return await self.transcript(audio, quietly=True)

    def _drop_guess(self) -> None:
        """The utterance's transcription so far and the answer begun on it are dropped (the speaker went on past a
        new start, listening ended): pieces waiting for the thread are cancelled; one already running cannot be
        stopped, and its text is never used."""
        self._pieces.drop()
        self._pieces = Pieces(self._transcribe_quietly)
        self._preempting = _dropped(self._preempting)
        self._deciding = _cancelled(self._deciding)


def _cancelled(task: asyncio.Task | None) -> None:
    """A decision dropped (the speech resumed, the full silence, listening ended): None in its place."""
    if task is not None:
        task.cancel()


def _dropped(preempting: asyncio.Future | None) -> None:
    """An answer begun at a proposed end, dropped (its chat stream closed, now or once it has begun): None in its
    place."""
    if preempting is None:
        return
    if preempting.done() and not preempting.cancelled() and preempting.exception() is None:
        if preempting.result() is not None:
            preempting.result().cancel()
    else:
        preempting.add_done_callback(_cancel_begun)
        preempting.cancel()


def _cancel_begun(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is None and task.result() is not None:
        task.result().cancel()
