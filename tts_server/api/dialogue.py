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
from ..core.jobs import Busy, Job
from ..core.listening import Listener
from ..core.respond import answer, chat_messages
from ..core.sessions import StoredTurn
from ..core.turns import StreamedTurn
from ..engines.base import ContextTurn
from ..engines.request import SynthesisRequest, new_request_id
from . import dialogue_schemas as d



class Dialogue:
    # set up by Connection.__init__
    _streaming: StreamedTurn | None
    _listener: Listener | None
    _answering: d.AnswerOptions | None
    _answers: set[asyncio.Task]
    _guess: asyncio.Future | None  # the transcript of a hands-free utterance, begun at its pause

    # -- sessions ------------------------------------------------------------------------------------------
    async def _bind(self, session: str | None) -> None:
        """A new session (``None``) or a stored one: its turns become this connection's history."""
        store = self.service.sessions
        if session is None:
            session, turns = await asyncio.to_thread(store.create, self.owner), []
        else:
            turns = await asyncio.to_thread(store.turns, session, self.owner)
        self.session = session
        self.conversation.history.clear()
        self.conversation.history.extend(turn.context() for turn in turns)
        await self.send({"status": "session", "session": session, "turns": len(turns)})

    async def _delete_session(self) -> None:
        if self.session is None:
            raise r.ProtocolError(r.ErrorCode.INVALID_REQUEST, "No session is bound to this connection")
        session, self.session = self.session, None
        await asyncio.to_thread(self.service.sessions.delete, session, self.owner)
        await self.send({"status": "session_deleted", "session": session})

    # -- the other side's turns ----------------------------------------------------------------------------
    async def _turn_start(self, message: d.TurnStartMessage) -> None:
        self._streaming = self._listener = None  # a turn left open is dropped for the new one
        if message.respond is not None and self.service.chat is None:
            raise self._no_chat(None)
        if message.vad:
            self._listener = await self.service.listener(message.speaker, message.sample_rate)
        else:
            self._streaming = await self.service.stream_turn(message.speaker, message.sample_rate)
        self._answering = message.respond

    async def _stream_audio(self, pcm: bytes) -> None:
        loop = asyncio.get_running_loop()
        if self._listener is not None:
            for event, turn in await loop.run_in_executor(self.service.turn_encoding, self._listener.feed, pcm):
                if event == "dropped":
                    await self.send(r.error_reply(r.ErrorCode.INVALID_REQUEST, "An utterance longer than a turn may "
                                                                               "last was dropped; listening goes on"))
                elif event == "speech_start":
                    await self.send({"status": "speech_start"})
                elif event == "pause":  # it may be over: transcribe what was said so far, while the pause lasts
                    if self._guess is None or self._guess.done():
                        heard = await loop.run_in_executor(self.service.turn_encoding, turn.so_far)
                        self._guess = asyncio.ensure_future(self._transcribe_quietly(heard))
                elif event == "resume":
                    self._guess = None  # it was not over (the transcription runs on; its text is not used)
                else:
                    guess, self._guess = self._guess, None
                    await self.send({"status": "speech_end"})
                    await self._close_turn(turn, None, guess)
            return
        try:
            await loop.run_in_executor(self.service.turn_encoding, self._streaming.feed, pcm)
        except r.ProtocolError:
            self._streaming = None
            raise

    async def _end_turn(self, text: str | None) -> None:
        listener, turn, self._listener, self._streaming = self._listener, self._streaming, None, None
        if listener is not None:  # hands-free listening ends; an utterance in progress ends with it
            if listener.turn is not None:
                await self._close_turn(listener.turn, text)
            return
        if turn is None:
            raise r.ProtocolError(r.ErrorCode.INVALID_REQUEST, "'turn_end' without an open turn: send 'turn_start' "
                                                               "and the audio first")
        await self._close_turn(turn, text)

    async def _close_turn(self, turn: StreamedTurn, text: str | None, guess: asyncio.Future | None = None) -> None:
        """End a streamed turn, transcribe it unless its text was given (or its pause already was: ``guess``), keep
        it; then answer it if asked to."""
        loop = asyncio.get_running_loop()
        audio = await loop.run_in_executor(self.service.turn_encoding, turn.end)
        text = (text or "").strip() or (await guess if guess is not None else None) or \
            await self.service.transcript(audio)
        await self._keep_turn(await loop.run_in_executor(self.service.turn_encoding, turn.finish, text))
        if self._answering is not None:
            await self._respond(self._answering, None)

    async def _transcribe_quietly(self, audio) -> str | None:
        """A transcript, or None where ``transcript`` would refuse (the turn's end asks again, and says why)."""
        try:
            return await self.service.transcript(audio)
        except Exception:
            return None

    async def _save_turn(self, message: d.TurnMessage, data: bytes) -> None:
        """The other side's turn: checked as a voice upload, encoded to CSM's codes, stored, then answered."""
        audio = await self._checked_audio(data, "Turn audio")
        text = message.text or await self.service.transcript(audio)
        await self._keep_turn(ContextTurn(message.speaker, text, audio, {"csm": await self.service.codes_of(audio)}))

    async def _keep_turn(self, turn: ContextTurn) -> None:
        """Into the history, and the session's store when one is bound; then ``turn_saved``."""
        turns = len(self.conversation.history) + 1
        if self.session is not None:
            turns = await asyncio.to_thread(self.service.sessions.append, self.session, self.owner,
                                            StoredTurn.of(turn))
        self.conversation.history.append(turn)
        await self.send({"status": "turn_saved", "speaker": turn.speaker, "text": turn.text,
                         "duration_s": round(turn.duration_s, 3), "turns": turns})

    # -- the assistant's answers ---------------------------------------------------------------------------
    async def _respond(self, options: d.AnswerOptions, request_id: str | None) -> None:
        """Ask the chat model for the answer to the transcript; it is spoken as it is written (``core.respond``)."""
        request_id = request_id or new_request_id()
        chat = self.service.chat
        if chat is None:
            raise self._no_chat(request_id)
        messages = chat_messages(list(self.conversation.history), options.speaker)
        if not messages:
            raise r.ProtocolError(r.ErrorCode.INVALID_REQUEST, "Nothing to answer yet: this conversation has no "
                                                               "turns with text", request_id)
        request = SynthesisRequest(text="…", request_id=request_id, speaker=options.speaker, seed=options.seed,
                                   temperature=options.temperature, top_k=options.top_k,
                                   max_audio_length_ms=options.max_audio_length_ms, format=options.format,
                                   stream=True, timestamps=options.timestamps)
        job = self._new_job(request)
        job.cache_salt = None  # its text is the LLM's: never answered from the cache
        self.live[request_id] = job
        self.jobs.put_nowait(job)
        task = asyncio.create_task(answer(job, chat, messages, self._queue_answer,
                                          self.service.max_text_chars), name=f"answer-{request_id}")
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    def _queue_answer(self, job: Job) -> None:
        """Its first sentence is written: into the scheduler's queue."""
        try:
            notice = self.service.scheduler.submit(job)
        except Busy as exc:
            raise r.ProtocolError(r.ErrorCode.BUSY, str(exc), job.request_id) from None
        if notice and not self._told_loading:
            self._told_loading = True
            job.post(r.loading_reply(notice, job.request_id))

    def _no_chat(self, request_id: str | None) -> r.ProtocolError:
        return r.ProtocolError(r.ErrorCode.INVALID_REQUEST, "This server has no chat model to write answers: start "
                                                            "it with --chat-url and --chat-model", request_id)
