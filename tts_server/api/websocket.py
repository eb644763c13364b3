"""The WebSocket interface (``/`` and ``/ws``): a thin adapter from frames to jobs of the shared core.

Each connection runs two tasks, in the manner of wyoming-piper's handler:

- the *reader* parses every frame (``schemas``), answers bad input at once
  with a JSON error, and hands synthesis requests to the scheduler;
- the *writer* sends each accepted job's replies in the order the requests
  arrived, so answers on one connection never overtake each other.

Rejections (validation errors, ``busy``, ``loading`` notices) are sent at once
rather than queued behind audio; they carry the ``request_id`` they answer.
Closing a connection cancels all of its queued and running jobs.  The
handshake is refused with HTTP 401/403 and a body (ASGI's denial response).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging

from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..core import replies as r
from ..core.context import Conversation, heard
from ..core.events import Audio, Failed, Frame, Loading, Reset, Truncated, VoiceCleared, VoiceSaved, failed
from ..core.fair import Dropped
from ..core.listening import Listener
from ..core.jobs import END, Job
from ..core.security import RateLimiter
from ..core.service import Service
from ..core.turns import StreamedTurn
from ..engines.base import ContextTurn
from ..references import ReferenceError
from ..references.quality import check_voice_prompt
from . import schemas as s
from .dialogue import Dialogue
from .dialogue_schemas import AnswerOptions
from .turn_guard import TurnGuard
from .ws_replies import encode

log = logging.getLogger(__name__)
PATHS = ("/", "/ws")


class Connection(Dialogue):
    """State of one WebSocket client: its jobs in arrival order, its conversation, a send lock."""

    def __init__(self, service: Service, ws: WebSocket, owner: str = "", counted_as: str = "") -> None:
        self.service = service
        self.ws = ws
        self.owner = owner  # whose sessions this connection may bind (a hash of its API key)
        self.counted_as = counted_as or owner  # whose share of the sessions those it creates take
        self.session: str | None = None
        self._turn: s.TurnMessage | None = None  # a turn message waiting for its binary frame
        self._streaming: StreamedTurn | None = None  # a turn streamed while its speaker talks
        self._listener: Listener | None = None  # hands-free turns (turn_start with vad)
        self._answering: AnswerOptions | None = None  # answer each saved turn (turn_start's respond)
        self._answers: set[asyncio.Task] = set()  # LLM streams of respond requests
        self._guess: asyncio.Future | None = None  # a hands-free utterance's transcript, begun at its pause
        # barge-in: recent replies' turns (and their places in the session), and replies to cut once they end
        # (its turns, its speed: the turns hold unstretched audio)
        self._replies: collections.OrderedDict[str, tuple[list[ContextTurn], float]] = collections.OrderedDict()
        self._stored: dict[str, list[int]] = {}
        self._cuts: dict[str, float] = {}
        self.jobs: asyncio.Queue[Job] = asyncio.Queue()
        self.live: dict[str, Job] = {}
        self.conversation = Conversation(service.library, service.limits.max_context_turns)
        self._voice: s.VoiceMessage | None = None  # a voice message waiting for its binary frame
        # One loading notice per connection: a client of the original protocol reads one notice, then the reply.
        self._told_loading = False
        self._rate = RateLimiter(service.limits.rate_limit)
        self._guard = TurnGuard(service.turns.audio_pace(), service.turns.turn_timeout)  # streamed audio's pace, open turns
        self._send_lock = asyncio.Lock()
        self._write_timeout: float = ws.app.state.write_timeout

    def limits(self) -> s.Limits:
        return s.Limits(max_text_chars=self.service.limits.max_text_chars, emotions=self.service.emotions)

    async def send(self, *frames: Frame) -> None:
        """Send frames back to back (metadata + audio must not be split by another reply): ``Audio`` as a binary
        frame, an event as its JSON text (``ws_replies``).  A client that takes none of them for ``--write-timeout``
        seconds is dropped: its socket and send buffer are freed."""
        async with self._send_lock:
            for frame in frames:
                message = {"type": "websocket.send", "bytes": frame.data} if isinstance(frame, Audio) else \
                    {"type": "websocket.send", "text": encode(frame)}
                try:
                    await asyncio.wait_for(self.ws.send(message), self._write_timeout)
                except asyncio.TimeoutError:
                    log.info("Dropped a WebSocket client that read nothing for %g s", self._write_timeout)
                    self.ws.app.state.connections.abort(self.ws.scope.get("client"))
                    raise WebSocketDisconnect(1006) from None

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):  # it may be closed already
            await self.ws.close(code, reason)

    async def run(self, session: str | None = None) -> None:
        notice = self.service.loading_notice()
        if notice:
            self._told_loading = True
            await self.send(Loading(notice))
        if session is not None:  # ?session=<id> on the URL: resumed right after the handshake
            try:
                await self._bind(session)
            except r.Refusal as exc:
                await self.send(failed(exc))
        writer = asyncio.create_task(self._write_replies())
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                raw = message.get("text")
                await self._handle(raw if raw is not None else message.get("bytes") or b"")
        except (WebSocketDisconnect, Dropped):  # it closed (its work on the shared threads was dropped)
            pass
        finally:
            for job in list(self.live.values()):
                job.cancel()
            for task in list(self._answers):
                task.cancel()
            self._drop_guess()
            self._guard.close()
            self._streaming = self._listener = None  # their buffers go now
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def _handle(self, raw: str | bytes) -> None:
        try:
            streaming = self._streaming is not None or self._listener is not None
            if isinstance(raw, bytes) and self._voice is None and self._turn is None and streaming:
                return await self._stream_audio(raw)
            pending, self._voice, self._turn = self._voice or self._turn, None, None
            if pending is not None:
                if isinstance(raw, bytes):
                    save = self._save_voice if isinstance(pending, s.VoiceMessage) else self._save_turn
                    return await save(pending, raw)
                what = "Voice upload" if isinstance(pending, s.VoiceMessage) else "Turn"
                await self.send(Failed(r.ErrorCode.INVALID_REQUEST,
                                       f"{what} abandoned: its message must be followed by one binary frame "
                                       "holding the audio file"))
            message = s.parse_message(raw, self.limits())
            counted = (s.SynthesizeMessage, s.VoiceMessage, s.TurnMessage, s.TurnStartMessage, s.RespondMessage)
            creates = isinstance(message, s.SessionMessage) and message.session is None  # a new session
            if (isinstance(message, counted) or creates) and not self._rate.allow():
                raise r.rate_limited(self.service.limits.rate_limit, message.request_id)
            if isinstance(message, s.SynthesizeMessage):
                await self._synthesize(message.to_request())
            elif isinstance(message, s.CancelMessage):
                await self._cancel(message.request_id, message.played_ms)
            elif isinstance(message, s.VoiceMessage):
                await self._voice_message(message)
            elif isinstance(message, s.TurnMessage):
                if message.text is None:
                    self.service.speech.refuse_without()  # refused now, before the client sends its audio
                self._turn = message
            elif isinstance(message, s.SessionMessage):
                await self._bind(message.session)
            elif isinstance(message, s.SessionDeleteMessage):
                await self._delete_session()
            elif isinstance(message, s.TurnStartMessage):
                await self._turn_start(message)
            elif isinstance(message, s.TurnEndMessage):
                await self._end_turn(message.text)
            elif isinstance(message, s.RespondMessage):
                await self._respond(message, message.request_id)
            else:
                self.conversation.reset()
                await self.send(Reset())
        except r.Refusal as exc:
            await self.send(failed(exc))
        except (WebSocketDisconnect, OSError, Dropped):
            raise
        except Exception:  # a bug must cost one reply, not the connection
            log.exception("internal error while handling a message")
            await self.send(Failed(r.ErrorCode.INTERNAL_ERROR, "Internal server error"))

    async def _synthesize(self, request) -> None:
        if request.context:
            await self._check_session(request.request_id)
        job = self._new_job(request)
        job.cache_salt = "websocket"  # with context off its prompt is the text (and emotion clip) alone
        notice = self.service.scheduler.submit(job)
        self.live[request.request_id] = job
        self.jobs.put_nowait(job)
        if notice and not self._told_loading:
            self._told_loading = True
            await self.send(Loading(notice, request.request_id))

    def _new_job(self, request) -> Job:
        """A job for ``request`` on this connection (prompted with its history, stored in its session), or the
        reason it cannot be taken."""
        if self.service.admission.draining:
            raise r.shutting_down(request.request_id)
        if request.request_id in self.live:
            raise r.Refusal(r.ErrorCode.INVALID_REQUEST,
                                  f"request_id {request.request_id!r} is already in use on this connection",
                                  request.request_id)
        if sum(not job.finished for job in self.live.values()) >= self.service.limits.max_queued_per_connection:
            raise r.too_many_queued(self.service.limits.max_queued_per_connection, request.request_id)
        job = Job(request, asyncio.get_running_loop(), prepare=lambda j: self.conversation.prompt_for(j.task),
                  on_success=self._remember)
        job.owner = self
        if self.session is not None and request.context:
            session = self.session

            async def persist(j: Job) -> None:  # its places in the session, for a cut after a barge-in
                self._stored[j.request_id] = await self.service.sessions.extend(session, self.owner, j.task.produced)
            job.persist = persist
        return job

    def _remember(self, job: Job) -> None:
        """After a success: extend the history, and pin the speaker's voice if it has none yet."""
        self.conversation.remember(job.task)
        speaker, produced = job.request.speaker, list(job.task.produced)
        if job.request.context:
            self._replies[job.request_id] = produced, job.request.speed
            while len(self._replies) > 2 * self.service.limits.max_context_turns:
                self._stored.pop(self._replies.popitem(last=False)[0], None)
        library = self.service.library
        if job.request.context and speaker not in self.conversation.voices and library.wants_pin(speaker, produced):
            self.service.background(asyncio.to_thread(library.pin, speaker, produced))

    async def _voice_message(self, message: s.VoiceMessage) -> None:
        if message.clear:
            cleared = self.conversation.clear_voice(message.speaker)
            await self.send(VoiceCleared(message.speaker, cleared))
        else:
            self._voice = message

    async def _checked_audio(self, data: bytes, what: str):
        """An uploaded file (a voice prompt, a turn) decoded and checked off the loop, or ``invalid_voice``."""
        try:
            return await asyncio.to_thread(check_voice_prompt, data, self.service.limits.max_voice_bytes,
                                           self.service.limits.max_voice_seconds)
        except ReferenceError as exc:
            raise r.Refusal(r.ErrorCode.INVALID_VOICE, f"{what} rejected: {exc}") from None

    async def _save_voice(self, message: s.VoiceMessage, data: bytes) -> None:
        audio = await self._checked_audio(data, "Voice prompt")
        turn = self.conversation.set_voice(message.speaker, (message.text or "").strip(), audio)
        await self.send(VoiceSaved(message.speaker, round(turn.duration_s, 3)))

    async def _cancel(self, request_id: str, played_ms: float | None = None) -> None:
        """Stop a request; with ``played_ms`` (barge-in) also keep only what was heard of its reply, whether it
        still runs (cut once it has ended ``cancelled``) or already finished."""
        job = self.live.get(request_id)
        if job is not None and (job.cancel() or played_ms is not None):
            if played_ms is not None:
                self._cuts[request_id] = played_ms  # the writer cuts it after the reply's last frame
            return
        if played_ms is None or request_id not in self._replies:
            raise r.Refusal(r.ErrorCode.UNKNOWN_REQUEST,
                                  f"No queued or running request {request_id!r} on this connection", request_id)
        await self._cut(request_id, played_ms, None)

    async def _cut(self, request_id: str, played_ms: float, job: Job | None) -> None:
        """The reply's turns become what was heard of them, in the history and the session; then ``truncated``."""
        old, speed = self._replies.pop(request_id, (None, 1.0))
        if old is None:  # cancelled while it ran: never remembered; its finished sentences were heard first, then
            task = job.task if job is not None and job.request.context else None  # the start of the one cut off
            old = list(task.produced) + ([task.unfinished] if task.unfinished else []) if task else []
            speed = job.request.speed if job is not None else 1.0
        kept = heard(old, played_ms / 1000 * speed)
        self.conversation.replace(old, kept)
        seqs = self._stored.pop(request_id, None)
        if self.session is not None and (seqs or kept):
            store = self.service.sessions
            try:
                if seqs:
                    await store.replace(self.session, self.owner, seqs, kept)
                else:
                    await store.extend(self.session, self.owner, kept)
            except r.Refusal as exc:  # the store is down: the cut is this connection's alone
                raise r.Refusal(exc.code, exc.message, request_id) from None
        await self.send(Truncated(request_id, round(sum(turn.duration_s for turn in kept), 3)))

    async def _write_replies(self) -> None:
        while True:
            job = await self.jobs.get()
            try:
                while (item := await job.outbox.get()) is not END:
                    await self.send(*item)
                    job.unsent_bytes(-sum(len(f.data) for f in item if isinstance(f, Audio)))
            finally:
                self.live.pop(job.request_id, None)
            if (played_ms := self._cuts.pop(job.request_id, None)) is not None:
                try:
                    await self._cut(job.request_id, played_ms, job)
                except r.Refusal as exc:  # told, and the writer lives on for the connection's next replies
                    await self.send(failed(exc))


async def serve(ws: WebSocket) -> None:
    """One WebSocket, from the handshake to the close (the route for ``/`` and ``/ws``)."""
    service: Service = ws.app.state.service
    open_connections: set[Connection] = ws.app.state.websockets
    target = ws.scope["path"] + ("?" + ws.scope["query_string"].decode("latin-1") if ws.scope["query_string"] else "")
    verdict = service.admission.gate.check(ws.headers, target, websocket=True)
    if verdict is not None:
        return await ws.send_denial_response(PlainTextResponse(verdict.reason, verdict.status))
    client = tuple(ws.scope["client"] or ("?", 0))
    address = service.admission.proxies.client(client[0], ws.headers)
    refusal = service.admission.admit(client, address)
    await ws.accept()
    if refusal is not None:
        await ws.send_text(encode(failed(refusal)))
        return await ws.close(1013, "try again later")
    owner = service.admission.owner(ws.headers, target)
    connection = Connection(service, ws, owner, service.admission.counted_as(owner, address))
    open_connections.add(connection)
    try:
        await connection.run(ws.query_params.get("session"))
    finally:
        open_connections.discard(connection)
