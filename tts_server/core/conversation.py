"""A conversation that any interface can hold: its session, its history, the other side's turns, the assistant's
answers, and barge-in.

The interface gives it a ``Peer`` (``core.peer``): events go out through
``send``, jobs are put in line on the interface's ordered writer with
``enqueue``; the conversation never sees a socket or a wire format.  The
WebSocket's ``Connection`` holds one per client today.

- **Session**: ``bind`` makes a stored session (or a new one) the history; every
  reply and turn is stored in it, so a conversation resumes on any connection
  or replica sharing the store.
- **History** (``context.History``): the prompt's memory, bounded, and the
  voice prompts the client uploaded.
- **The other side's turns**: sent whole (``turn``, a file), streamed or heard
  hands-free (``start_turn``, ``audio``, ``end_turn``: ``core.hearing``).
- **Answers**: ``respond`` asks the chat model and speaks its answer as it is
  written (``core.respond``).
- **Barge-in**: ``barge_in`` keeps only what the listener heard of a reply; a
  reply still running is cut once it has ended (``ended``), when its turns are
  final.
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..audio.pcm import OUTPUT_RATE
from ..engines.base import TURN_CODES, ContextTurn
from ..engines.chat import ChatModel
from ..engines.errors import ErrorCode, Refusal
from ..engines.request import SynthesisRequest
from ..references import ReferenceError
from ..references.quality import check_voice_prompt
from .context import History, heard
from .events import Reset, SessionBound, SessionDeleted, Truncated, TurnSaved, failed
from .fair import Dropped
from .hearing import Hearing
from .jobs import Job
from .peer import Peer
from .preempt import Preemptive
from .respond import answer, chat_messages
from .security import RateLimiter
from .sessions import StoredTurn
from .streamed_text import StreamedText

if TYPE_CHECKING:
    from .service import Limits, Service


class Conversation:
    """One client's conversation (see the module docstring)."""

    def __init__(self, service: Service, peer: Peer, owner: str = "", counted_as: str = "",
                 rate: RateLimiter | None = None) -> None:
        """``owner``: whose sessions it may bind (a hash of the API key); ``counted_as``: whose share of the sessions
        those it creates take; ``rate``: the client's requests a minute, which answers to hands-free turns use too."""
        self.service, self.peer = service, peer
        self.owner, self.counted_as = owner, counted_as or owner
        self.session: str | None = None
        self.memory = History(service.library, service.limits.max_context_turns)
        self.hearing = Hearing(service, peer, rate or RateLimiter(service.limits.rate_limit), self._keep,
                               self.respond, self.prefetch)
        self._answers: set[asyncio.Task] = set()  # answers being written (the chat model's, a client's text streams)
        # barge-in: recent replies' turns and speeds (the turns hold unstretched audio), their places in the session,
        # and the replies to cut once they end (ms heard)
        self._replies: collections.OrderedDict[str, tuple[list[ContextTurn], float]] = collections.OrderedDict()
        self._stored: dict[str, list[int]] = {}
        self._cuts: dict[str, float] = {}

    @property
    def history(self) -> collections.deque[ContextTurn]:
        """The turns the next reply is prompted with, oldest first."""
        return self.memory.history

    # -- the session ----------------------------------------------------------------------------------------
    async def bind(self, session: str | None) -> None:
        """A new session (``None``) or a stored one: its turns become the history."""
        await self.hearing.settle()  # an utterance heard before this message goes to the session it was heard in
        store = self.service.sessions
        if session is None:
            session, turns = await store.create(self.owner, self.counted_as), []
        else:
            turns = await store.turns(session, self.owner)
        self.session = session
        self.memory.history.clear()
        self.memory.history.extend(turn.context() for turn in turns)
        await self.peer.send(SessionBound(session, len(turns)))

    async def check_session(self, request_id: str) -> None:
        """Before a reply that joins the bound session is generated: the session is there and the store answers
        (``store_unavailable``, ``unknown_session`` now, not after the audio)."""
        if self.session is None:
            return
        try:
            await self.service.sessions.touch(self.session, self.owner)
        except Refusal as exc:
            raise Refusal(exc.code, exc.message, request_id) from None

    async def delete_session(self) -> None:
        """The bound session and its turns are deleted; the history stays until the conversation ends."""
        if self.session is None:
            raise Refusal(ErrorCode.INVALID_REQUEST, "No session is bound to this connection")
        await self.hearing.settle()
        session, self.session = self.session, None
        await self.service.sessions.delete(session, self.owner)
        await self.peer.send(SessionDeleted(session))

    async def reset(self) -> None:
        """The history is forgotten (the session keeps its turns)."""
        await self.hearing.settle()
        self.memory.reset()
        await self.peer.send(Reset())

    # -- the replies ------------------------------------------------------------------------------------------
    def job(self, request: SynthesisRequest) -> Job:
        """A job for ``request`` in this conversation: prompted with its history (``context``), remembered once it
        succeeds, and stored in the bound session, where a barge-in can later find its turns."""
        job = Job(request, asyncio.get_running_loop(), prepare=lambda j: self.memory.prompt_for(j.task),
                  on_success=self._remember)
        job.owner = self.peer  # one running job per client
        if self.session is not None and request.context:
            session = self.session

            async def persist(j: Job) -> None:  # its places in the session, for a cut after a barge-in
                self._stored[j.request_id] = await self.service.sessions.extend(session, self.owner, j.task.produced)
            job.persist = persist
        return job

    def _remember(self, job: Job) -> None:
        """After a success: extend the history, and pin the speaker's voice if it has none yet."""
        self.memory.remember(job.task)
        speaker, produced = job.request.speaker, list(job.task.produced)
        if job.request.context:
            self._replies[job.request_id] = produced, job.request.speed
            while len(self._replies) > 2 * self.service.limits.max_context_turns:
                self._stored.pop(self._replies.popitem(last=False)[0], None)
        library = self.service.library
        if job.request.context and speaker not in self.memory.voices and library.wants_pin(speaker, produced):
            self.service.background(asyncio.to_thread(library.pin, speaker, produced))

    async def respond(self, request: SynthesisRequest, begun: Preemptive | None = None) -> None:
        """The chat model writes the answer to the transcript, spoken as it is written (``core.respond``) with
        ``request``'s speaker and sampling.  ``begun``: the answer the chat model began before the last turn was
        confirmed (``core.preempt``), used if it was asked the same, else closed."""
        try:  # whatever happens, the begun answer's stream is closed unless this answer takes it, and then with it
            chat, messages = await self._chat_messages(request.speaker, request.request_id)
            if begun is not None and begun.messages != messages:
                begun.cancel()
                begun = None
            job = self.job(request)
            job.cache_salt = None  # its text is the LLM's: never answered from the cache
            self.peer.enqueue(job)
            task = asyncio.create_task(answer(job, chat, messages, self.peer.schedule,
                                              self.service.limits.max_text_chars,
                                              begun.stream() if begun is not None else None),
                                       name=f"answer-{request.request_id}")
        except BaseException:
            if begun is not None:
                begun.cancel()
            raise
        if begun is not None:  # (an answer cancelled before its first step never opens the stream it was given)
            task.add_done_callback(lambda _: begun.cancel())
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    async def stream_text(self, request: SynthesisRequest) -> StreamedText:
        """A reply whose text the client sends in pieces (``core.streamed_text``), in line with its other replies;
        ``request.text`` is its beginning.  Never answered from the cache; failed once it completes no sentence
        for ``--text-timeout`` seconds."""
        self.service.scheduler.route(request)  # a language or engine no one serves is refused now, not later
        if request.context:
            await self.check_session(request.request_id)
        job = self.job(request)
        job.cache_salt = None
        self.peer.enqueue(job)
        text = StreamedText(job, self.peer.schedule, self.service.limits.max_text_chars,
                            self.service.limits.text_timeout)
        watch = asyncio.create_task(text.watch(), name=f"text-{request.request_id}")
        self._answers.add(watch)
        watch.add_done_callback(self._answers.discard)
        if request.text:
            text.add(request.text)
        return text

    async def prefetch(self, speaker: int, text: str, assistant: int) -> Preemptive | None:
        """Begin the answer to a turn of ``speaker`` saying ``text`` that is not confirmed yet (``core.preempt``);
        None where ``respond`` would refuse (it then says why)."""
        try:
            chat, messages = await self._chat_messages(assistant, None, ContextTurn(speaker, text))
        except Refusal:
            return None
        return Preemptive(chat, messages, self.service.limits.max_text_chars)

    async def _chat_messages(self, assistant: int, request_id: str | None,
                             pending: ContextTurn | None = None) -> tuple[ChatModel, list[dict[str, str]]]:
        """The chat model and what it reads: the session's stored turns (those of every connection on it), else
        ours, and ``pending``; refused without a chat model, turns with text, or a store that answers."""
        chat = self.service.chat
        if chat is None:
            raise no_chat(request_id)
        try:
            transcript = list(self.memory.history) if self.session is None else \
                await self.service.sessions.turns(self.session, self.owner)
        except Refusal as exc:  # the store is down: refused under this answer's id
            raise Refusal(exc.code, exc.message, request_id) from None
        messages = chat_messages([*transcript, *([pending] if pending else [])], assistant)
        if not messages:
            raise Refusal(ErrorCode.INVALID_REQUEST, "Nothing to answer yet: this conversation has no turns with "
                                                     "text", request_id)
        return chat, messages

    # -- the other side's turns ---------------------------------------------------------------------------------
    async def turn(self, speaker: int, text: str | None, data: bytes) -> None:
        """A turn sent whole (an audio file): checked as a voice upload, transcribed unless its text was given,
        encoded to the turn encoder's codes, kept."""
        audio = await checked_audio(data, self.service.limits, "Turn audio")
        if self.peer.gone():
            raise Dropped("its connection closed")
        text = text or await self.hearing.transcript(audio, OUTPUT_RATE)
        codes = await self.service.turns.codes_of(audio, self.peer.key)
        await self._keep(ContextTurn(speaker, text, audio, {TURN_CODES: codes}))

    async def start_turn(self, speaker: int, sample_rate: int, vad: bool = False,
                         answer: Callable[[str], SynthesisRequest] | None = None, language: str | None = None) -> None:
        """A turn streamed as it is spoken, or (``vad``) hands-free listening; ``answer`` (the request of an
        answer, given its id) has the assistant answer every turn kept until the next ``start_turn``; ``language``:
        what the speaker speaks, if the client knows."""
        await self.hearing.settle()  # an utterance already heard to its end is kept first
        self.hearing.close()  # a turn left open is dropped for the new one, even when this one is refused
        if answer is not None and self.service.chat is None:
            raise no_chat(None)
        await self.hearing.start(speaker, sample_rate, vad, answer)
        self.hearing.language = language or self.hearing.language

    async def _keep(self, turn: ContextTurn) -> None:
        """Into the history, and the session's store when one is bound; then ``turn_saved``."""
        turns = None
        if self.session is not None:
            turns = await self.service.sessions.append(self.session, self.owner, StoredTurn.of(turn))
        self.memory.history.append(turn)
        if turns is None:  # the turns kept: the history holds at most --max-context-turns
            turns = len(self.memory.history)
        await self.peer.send(TurnSaved(turn.speaker, turn.text, round(turn.duration_s, 3), turns))

    # -- barge-in -----------------------------------------------------------------------------------------------
    async def barge_in(self, request_id: str, played_ms: float, job: Job | None) -> None:
        """The listener interrupted a reply after hearing ``played_ms`` of it: stop it, and keep only what was heard.
        A reply still in line (``job``, enqueued) is cut once it has ended; one that already ended, now."""
        if job is not None:
            job.cancel()
            self._cuts[request_id] = played_ms  # cut after the reply's last frame (``ended``)
            return
        if request_id not in self._replies:
            raise unknown_request(request_id)
        await self._cut(request_id, played_ms, None)

    async def ended(self, job: Job) -> None:
        """After a job's last reply went out: a barge-in while it ran cuts it now (told ``failed`` if the store is
        down: the cut is then this conversation's alone)."""
        played_ms = self._cuts.pop(job.request_id, None)
        if played_ms is None:
            return
        try:
            await self._cut(job.request_id, played_ms, job)
        except Refusal as exc:
            await self.peer.send(failed(exc))

    async def _cut(self, request_id: str, played_ms: float, job: Job | None) -> None:
        """The reply's turns become what was heard of them, in the history and the session; then ``truncated``."""
        old, speed = self._replies.pop(request_id, (None, 1.0))
        if old is None:  # cancelled while it ran: never remembered; its finished sentences were heard first, then
            task = job.task if job is not None and job.request.context else None  # the start of the one cut off
            old = list(task.produced) + ([task.unfinished] if task.unfinished else []) if task else []
            speed = job.request.speed if job is not None else 1.0
        kept = heard(old, played_ms / 1000 * speed)
        self.memory.replace(old, kept)
        seqs = self._stored.pop(request_id, None)
        if self.session is not None and (seqs or kept):
            store = self.service.sessions
            try:
                if seqs:
                    await store.replace(self.session, self.owner, seqs, kept)
                else:
                    await store.extend(self.session, self.owner, kept)
            except Refusal as exc:  # the store is down: the cut is this conversation's alone
                raise Refusal(exc.code, exc.message, request_id) from None
        await self.peer.send(Truncated(request_id, round(sum(turn.duration_s for turn in kept), 3)))

    def close(self) -> None:
        """The client has gone: the answers being written stop, listening ends (jobs are the interface's)."""
        for task in list(self._answers):
            task.cancel()
        self.hearing.close()


async def checked_audio(data: bytes, limits: Limits, what: str) -> np.ndarray:
    """An uploaded file (a voice prompt, a turn) decoded and checked off the loop, or ``invalid_voice``."""
    try:
        return await asyncio.to_thread(check_voice_prompt, data, limits.max_voice_bytes, limits.max_voice_seconds)
    except ReferenceError as exc:
        raise Refusal(ErrorCode.INVALID_VOICE, f"{what} rejected: {exc}") from None


def unknown_request(request_id: str) -> Refusal:
    return Refusal(ErrorCode.UNKNOWN_REQUEST, f"No queued or running request {request_id!r} on this connection",
                   request_id)


def no_chat(request_id: str | None) -> Refusal:
    return Refusal(ErrorCode.INVALID_REQUEST, "This server has no chat model to write answers: start it with "
                                              "--chat-url and --chat-model", request_id)
