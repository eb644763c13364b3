"""The conversation half of a WebSocket connection: its session, the other side's turns, the assistant's answers.

``Dialogue`` is mixed into ``websocket.Connection`` (which owns the socket, the
jobs and the writer).  The other side's turns arrive whole (``turn`` + a file),
streamed (``turn_start``, PCM frames, ``turn_end``), or hands-free
(``turn_start`` with ``vad``: the server ends each utterance at a pause).
``respond`` asks the chat model for the assistant's answer to the transcript and
speaks it as it is written (``core.respond``); ``turn_start``'s ``respond``
does that after every saved turn.
"""

from __future__ import annotations

import asyncio

from ..core import replies as r
from ..core.events import (Failed, Loading, SessionBound, SessionDeleted, SpeechEnded, SpeechStarted, TurnSaved,
                           failed)
from ..core.fair import Dropped
from ..core.jobs import Job
from ..core.listening import Heard, Listener
from ..core.respond import answer, chat_messages
from ..core.security import RateLimiter
from ..core.sessions import StoredTurn
from ..core.turns import TRANSCRIPT_RATE, StreamedTurn
from ..engines.base import TURN_CODES, ContextTurn
from ..engines.request import new_request_id
from . import dialogue_schemas as d
from .turn_guard import TurnGuard



class Dialogue:
    # set up by Connection.__init__
    _streaming: StreamedTurn | None
    _listener: Listener | None
    _answering: d.AnswerOptions | None
    _answers: set[asyncio.Task]
    _guess: asyncio.Future | None  # the transcript of a hands-free utterance, begun at its pause
    _guard: TurnGuard  # the pace of streamed audio, and how long a turn may stay open
    _rate: RateLimiter  # the connection's requests a minute: answers to hands-free turns count too
    counted_as: str  # whose share of --max-sessions-per-owner the sessions it creates take

    # -- sessions ------------------------------------------------------------------------------------------
    async def _bind(self, session: str | None) -> None:
        """A new session (``None``) or a stored one: its turns become this connection's history."""
        store = self.service.sessions
        if session is None:
            session, turns = await store.create(self.owner, self.counted_as), []
        else:
            turns = await store.turns(session, self.owner)
        self.session = session
        self.conversation.history.clear()
        self.conversation.history.extend(turn.context() for turn in turns)
        await self.send(SessionBound(session, len(turns)))

    async def _check_session(self, request_id: str) -> None:
        """Before a reply that joins the bound session is generated: the session is there and the store answers
        (``store_unavailable``, ``unknown_session`` now, not after the audio)."""
        if self.session is None:
            return
        try:
            await self.service.sessions.touch(self.session, self.owner)
        except r.Refusal as exc:
            raise r.Refusal(exc.code, exc.message, request_id) from None

    async def _delete_session(self) -> None:
        if self.session is None:
            raise r.Refusal(r.ErrorCode.INVALID_REQUEST, "No session is bound to this connection")
        session, self.session = self.session, None
        await self.service.sessions.delete(session, self.owner)
        await self.send(SessionDeleted(session))

    # -- the other side's turns ----------------------------------------------------------------------------
    async def _turn_start(self, message: d.TurnStartMessage) -> None:
        self._streaming = self._listener = None  # a turn left open is dropped for the new one
        self._drop_guess()
        self._guard.close()
        if message.respond is not None and self.service.chat is None:
            raise self._no_chat(None)
        if message.vad:
            self._listener = await self.service.turns.listener(message.speaker, message.sample_rate)
        else:
            self._streaming = await self.service.turns.stream_turn(message.speaker, message.sample_rate)
            self._guard.open(lambda turn=self._streaming: self._overstayed(turn))
        self._answering = message.respond

    @property
    def _client(self) -> tuple:
        """This connection as the server admitted it: its key for its turn on the shared model threads."""
        return tuple(self.ws.scope.get("client") or ("?", 0))

    async def _encode(self, fn, *args):
        """``fn(*args)`` on the turn-encoding thread, in this connection's turn (``fair.Dropped`` once it closed)."""
        self._check_open()
        return await self.service.turns.run(self._client, fn, *args)

    def _check_open(self) -> None:
        """``fair.Dropped`` if the client has gone, though frames it sent before are still being read: none of
        them is worth a model's time."""
        if self.ws.app.state.connections.gone(self._client):
            raise Dropped("its connection closed")

    async def _stream_audio(self, pcm: bytes) -> None:
        self._paced(pcm)
        if (listener := self._listener) is not None:
            for event, turn in await self._encode(listener.feed, pcm):
                if self._listener is not listener:  # dropped meanwhile (a new turn_start, the turn timeout)
                    return
                if event in (Heard.DROPPED, Heard.SPEECH_END):
                    self._guard.close()
                if event == Heard.DROPPED:
                    await self.send(Failed(r.ErrorCode.INVALID_REQUEST, "An utterance longer than a turn may "
                                                                        "last was dropped; listening goes on"))
                elif event == Heard.SPEECH_START:
                    self._guard.open(lambda: self._overstayed(listener))
                    await self.send(SpeechStarted())
                elif event == Heard.PAUSE:  # it may be over: transcribe what was said so far, while the pause lasts
                    self._drop_guess()  # (one still waiting from an earlier pause is stale)
                    heard = await self._encode(turn.so_far)
                    self._guess = asyncio.ensure_future(self._transcribe_quietly(heard))
                elif event == Heard.RESUME:
                    self._drop_guess()  # it was not over
                else:  # SPEECH_END
                    guess, self._guess = self._guess, None
                    await self.send(SpeechEnded())
                    await self._close_turn(turn, None, guess)
            return
        try:
            await self._encode(self._streaming.feed, pcm)
        except r.Refusal:
            self._streaming = None
            self._guard.close()
            raise

    def _paced(self, pcm: bytes) -> None:
        """Refuse a frame beyond the connection's pace before any work is queued for it; its turn (or the
        listening) is dropped."""
        try:
            self._guard.check(len(pcm), (self._listener or self._streaming).sample_rate,
                              "listening ended (an utterance in progress was dropped): send 'turn_start' to listen "
                              "again" if self._listener else "the streamed turn was dropped")
        except r.Refusal:
            self._streaming = self._listener = None
            self._drop_guess()
            self._guard.close()
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
            await self.send(reply)
        except Exception:
            pass

    async def _end_turn(self, text: str | None) -> None:
        self._guard.close()
        listener, turn, self._listener, self._streaming = self._listener, self._streaming, None, None
        self._drop_guess()
        if listener is not None:  # hands-free listening ends; an utterance in progress ends with it
            if listener.turn is not None:
                await self._close_turn(listener.turn, text)
            return
        if turn is None:
            raise r.Refusal(r.ErrorCode.INVALID_REQUEST, "'turn_end' without an open turn: send 'turn_start' "
                                                               "and the audio first")
        await self._close_turn(turn, text)

    async def _close_turn(self, turn: StreamedTurn, text: str | None, guess: asyncio.Future | None = None) -> None:
        """End a streamed turn, transcribe it unless its text was given (or its pause already was: ``guess``), keep
        it; then answer it if asked to."""
        audio = await self._encode(turn.end)
        text = (text or "").strip() or (await guess if guess is not None else None) or \
            await self.service.speech.transcript(audio, TRANSCRIPT_RATE, connection=self._client)
        await self._keep_turn(await self._encode(turn.finish, text))
        if self._answering is None:
            return
        if not self._rate.allow():  # an answer costs what a 'respond' does; the turn is kept all the same
            return await self.send(failed(r.rate_limited(self.service.limits.rate_limit)))
        await self._respond(self._answering, None)

    async def _transcribe_quietly(self, audio) -> str | None:
        """A transcript, or None where ``transcript`` would refuse (the turn's end asks again, and says why)."""
        try:
            return await self.service.speech.transcript(audio, TRANSCRIPT_RATE, connection=self._client)
        except Exception:
            return None

    def _drop_guess(self) -> None:
        """At most one speculative transcription per listener: a stale one (the speaker went on, a newer pause came,
        listening ended) is dropped while it waits for the thread; one already running cannot be stopped, and its
        text is never used."""
        guess, self._guess = self._guess, None
        if guess is not None:
            guess.cancel()

    async def _save_turn(self, message: d.TurnMessage, data: bytes) -> None:
        """The other side's turn: checked as a voice upload, encoded to CSM's codes, stored, then answered."""
        audio = await self._checked_audio(data, "Turn audio")
        self._check_open()
        text = message.text or await self.service.speech.transcript(audio, connection=self._client)
        codes = await self.service.turns.codes_of(audio, self._client)
        await self._keep_turn(ContextTurn(message.speaker, text, audio, {TURN_CODES: codes}))

    async def _keep_turn(self, turn: ContextTurn) -> None:
        """Into the history, and the session's store when one is bound; then ``turn_saved``."""
        turns = None
        if self.session is not None:
            turns = await self.service.sessions.append(self.session, self.owner, StoredTurn.of(turn))
        self.conversation.history.append(turn)
        if turns is None:  # the turns kept: the history holds at most --max-context-turns
            turns = len(self.conversation.history)
        await self.send(TurnSaved(turn.speaker, turn.text, round(turn.duration_s, 3), turns))

    # -- the assistant's answers ---------------------------------------------------------------------------
    async def _respond(self, options: d.AnswerOptions, request_id: str | None) -> None:
        """Ask the chat model for the answer to the transcript; it is spoken as it is written (``core.respond``)."""
        request_id = request_id or new_request_id()
        chat = self.service.chat
        if chat is None:
            raise self._no_chat(request_id)
        try:
            transcript = await self._transcript()
        except r.Refusal as exc:  # the store is down: refused under this answer's id
            raise r.Refusal(exc.code, exc.message, request_id) from None
        messages = chat_messages(transcript, options.speaker)
        if not messages:
            raise r.Refusal(r.ErrorCode.INVALID_REQUEST, "Nothing to answer yet: this conversation has no "
                                                               "turns with text", request_id)
        job = self._new_job(options.to_request(request_id))
        job.cache_salt = None  # its text is the LLM's: never answered from the cache
        self.live[request_id] = job
        self.jobs.put_nowait(job)
        task = asyncio.create_task(answer(job, chat, messages, self._queue_answer,
                                          self.service.limits.max_text_chars), name=f"answer-{request_id}")
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    async def _transcript(self) -> list[ContextTurn] | list[StoredTurn]:
        """What the chat model reads: the session's stored turns when one is bound (whole, and those of every
        connection on it), else this connection's history; ``chat_messages`` keeps the newest that fit."""
        if self.session is None:
            return list(self.conversation.history)
        return await self.service.sessions.turns(self.session, self.owner)

    def _queue_answer(self, job: Job) -> None:
        """Its first sentence is written: into the scheduler's queue."""
        notice = self.service.scheduler.submit(job)
        if notice and not self._told_loading:
            self._told_loading = True
            job.post(Loading(notice, job.request_id))

    def _no_chat(self, request_id: str | None) -> r.Refusal:
        return r.Refusal(r.ErrorCode.INVALID_REQUEST, "This server has no chat model to write answers: start "
                                                            "it with --chat-url and --chat-model", request_id)
