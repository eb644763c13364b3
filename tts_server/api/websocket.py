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

Everything conversational (the session, the history, the other side's turns,
``respond``, barge-in) is the connection's ``core.conversation.Conversation``;
the connection is its ``Peer``: it sends the events and keeps the jobs in line.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging

from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..core import replies as r
from ..core.conversation import Conversation, checked_audio, unknown_request
from ..core.events import Audio, Failed, Frame, Loading, VoiceCleared, VoiceSaved, failed
from ..core.fair import Dropped
from ..core.jobs import Job
from ..core.security import RateLimiter
from ..core.service import Service
from ..core.streamed_text import StreamedText
from ..engines.request import SynthesisRequest, new_request_id
from . import schemas as s
from .ws_replies import encode

log = logging.getLogger(__name__)
PATHS = ("/", "/ws")


class Connection:
    """One WebSocket client: its frames, its jobs in arrival order and their writer, a send lock; the ``Peer`` of
    its conversation."""

    def __init__(self, service: Service, ws: WebSocket, owner: str = "", counted_as: str = "") -> None:
        self.service = service
        self.ws = ws
        self.key = tuple(ws.scope.get("client") or ("?", 0))  # as admitted: its turn on the shared model threads
        self._turn: s.TurnMessage | None = None  # a turn message waiting for its binary frame
        self._voice: s.VoiceMessage | None = None  # a voice message waiting for its binary frame
        self.jobs: asyncio.Queue[Job] = asyncio.Queue()
        self.live: dict[str, Job] = {}
        self.streams: dict[str, StreamedText] = {}  # replies whose text is still arriving (``text_stream``)
        self._ended_streams: collections.deque[str] = collections.deque(maxlen=64)  # for a clear late-piece error
        self.closed = False  # its reader has ended: the client is gone
        # One loading notice per connection: a client of the original protocol reads one notice, then the reply.
        self._told_loading = False
        self._rate = RateLimiter(service.limits.rate_limit)
        self._send_lock = asyncio.Lock()
        self._write_timeout: float = ws.app.state.write_timeout
        self.conversation = Conversation(service, self, owner, counted_as, self._rate)

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
                await self.conversation.bind(session)
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
            self.closed = True
            for job in list(self.live.values()):
                job.cancel()
            self.conversation.close()  # its answers stop, an open turn's buffers go now
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def _handle(self, raw: str | bytes) -> None:
        try:
            if isinstance(raw, bytes) and self._voice is None and self._turn is None and \
                    self.conversation.hearing.open:
                return await self.conversation.hearing.audio(raw)  # the streamed turn's or the listening's PCM
            pending, self._voice, self._turn = self._voice or self._turn, None, None
            if pending is not None:
                if isinstance(raw, bytes):
                    if isinstance(pending, s.VoiceMessage):
                        return await self._save_voice(pending, raw)
                    return await self.conversation.turn(pending.speaker, pending.text, raw)
                what = "Voice upload" if isinstance(pending, s.VoiceMessage) else "Turn"
                await self.send(Failed(r.ErrorCode.INVALID_REQUEST,
                                       f"{what} abandoned: its message must be followed by one binary frame "
                                       "holding the audio file"))
            message = s.parse_message(raw, self.limits())
            counted = (s.SynthesizeMessage, s.VoiceMessage, s.TurnMessage, s.TurnStartMessage, s.RespondMessage)
            creates = isinstance(message, s.SessionMessage) and message.session is None  # a new session
            if (isinstance(message, counted) or creates) and not self._rate.allow():
                raise r.rate_limited(self.service.limits.rate_limit, message.request_id)
            await self._dispatch(message)
        except s.PieceRefusal as exc:  # a bad piece ends its open stream (its terminal error); else told alone
            stream = self.streams.get(exc.request_id or "")
            if stream is not None and stream.open:
                return stream.fail(exc)
            await self.send(failed(r.Refusal(exc.code, f"{exc.message} (text stream {exc.request_id!r})")))
        except r.Refusal as exc:
            if exc.request_id in self.live:  # a message naming a live request (its id reused, a bad piece): not the
                exc = r.Refusal(exc.code, f"{exc.message} (request {exc.request_id!r})")  # end of that one's reply
            await self.send(failed(exc))
        except (WebSocketDisconnect, OSError, Dropped):
            raise
        except Exception:  # a bug must cost one reply, not the connection
            log.exception("internal error while handling a message")
            await self.send(Failed(r.ErrorCode.INTERNAL_ERROR, "Internal server error"))

    async def _dispatch(self, message) -> None:
        """A parsed message to what handles it: synthesis and voices here, the rest to the conversation."""
        conversation = self.conversation
        if isinstance(message, s.SynthesizeMessage) and message.text_stream:
            request = message.to_request()
            self.streams[request.request_id] = await conversation.stream_text(request)
        elif isinstance(message, s.SynthesizeMessage):
            await self._synthesize(message.to_request())
        elif isinstance(message, (s.TextMessage, s.TextEndMessage)):
            self._stream_text(message)
        elif isinstance(message, s.CancelMessage):
            await self._cancel(message.request_id, message.played_ms)
        elif isinstance(message, s.VoiceMessage):
            await self._voice_message(message)
        elif isinstance(message, s.TurnMessage):
            if message.text is None:
                self.service.speech.refuse_without()  # refused now, before the client sends its audio
            self._turn = message
        elif isinstance(message, s.SessionMessage):
            await conversation.bind(message.session)
        elif isinstance(message, s.SessionDeleteMessage):
            await conversation.delete_session()
        elif isinstance(message, s.TurnStartMessage):
            answer = message.respond.to_request if message.respond is not None else None
            await conversation.start_turn(message.speaker, message.sample_rate, message.vad, answer, message.language)
        elif isinstance(message, s.TurnEndMessage):
            await conversation.hearing.end(message.text)
        elif isinstance(message, s.RespondMessage):
            await conversation.respond(message.to_request(message.request_id or new_request_id()))
        else:
            await conversation.reset()

    async def _synthesize(self, request: SynthesisRequest) -> None:
        if request.context:
            await self.conversation.check_session(request.request_id)
        job = self.conversation.job(request)
        job.cache_salt = "websocket"  # with context off its prompt is the text (and emotion clip) alone
        self._admit(request.request_id)
        notice = self.service.scheduler.submit(job)  # refused (busy) before it is in line: told at once
        self.live[request.request_id] = job
        self.jobs.put_nowait(job)
        if notice and not self._told_loading:
            self._told_loading = True
            await self.send(Loading(notice, request.request_id))

    def _admit(self, request_id: str) -> None:
        """Refuse a request this connection cannot take now: the server is draining, its id is in use, or too
        many of its requests are waiting."""
        if self.service.admission.draining:
            raise r.shutting_down(request_id)
        if request_id in self.live:
            raise r.Refusal(r.ErrorCode.INVALID_REQUEST,
                            f"request_id {request_id!r} is already in use on this connection", request_id)
        if sum(not job.finished for job in self.live.values()) >= self.service.limits.max_queued_per_connection:
            raise r.too_many_queued(self.service.limits.max_queued_per_connection, request_id)

    # -- the conversation's Peer ------------------------------------------------------------------------------
    def enqueue(self, job: Job) -> None:
        """A conversation's job (an answer) in line on the writer; it is scheduled once its first sentence is
        written (``schedule``)."""
        self._admit(job.request_id)
        self.live[job.request_id] = job
        self.jobs.put_nowait(job)

    def schedule(self, job: Job) -> None:
        notice = self.service.scheduler.submit(job)
        if notice and not self._told_loading:
            self._told_loading = True
            job.post(Loading(notice, job.request_id))

    def gone(self) -> bool:
        return self.closed or self.ws.app.state.connections.gone(self.key)

    def refuse_unqueued(self, refusal: r.Refusal) -> None:
        """At shutdown: replies in no queue yet (a text stream or a chat answer before its first sentence) end with
        ``refusal`` now; the scheduler refused those it held."""
        for request_id, job in list(self.live.items()):
            if job.started or job.finished:
                continue
            if (stream := self.streams.get(request_id)) is not None:
                stream.fail(refusal)
            else:
                job.cancel_event.set()  # the chat model's stream is closed
                job.finish(failed(r.Refusal(refusal.code, refusal.message, request_id)))

    # -- text streams ---------------------------------------------------------------------------------------------
    def _stream_text(self, message: s.TextMessage | s.TextEndMessage) -> None:
        """A piece or the end of a streamed text; for one that has ended (``text_end``, a cancel, its error) or
        that this connection never opened, an error."""
        stream = self.streams.get(message.request_id)
        if stream is None or not stream.open:  # told without the id: this is not the end of that request's reply
            ended = stream is not None or message.request_id in self._ended_streams
            raise r.Refusal(r.ErrorCode.INVALID_REQUEST if ended else r.ErrorCode.UNKNOWN_REQUEST,
                            f"The text stream {message.request_id!r} has ended (text_end, a cancel, or its error)"
                            if ended else f"No text stream {message.request_id!r} on this connection: send a "
                                          "'synthesize' with 'text_stream' first")
        if isinstance(message, s.TextEndMessage):
            return stream.end()
        if len(message.delta) > stream.room:
            return stream.fail(r.Refusal(r.ErrorCode.TEXT_TOO_LONG, f"The streamed text is over "
                                                                    f"{stream.max_chars} characters"))
        stream.add(message.delta, message.flush)

    # -- voices and cancels -------------------------------------------------------------------------------------
    async def _voice_message(self, message: s.VoiceMessage) -> None:
        if message.clear:
            cleared = self.conversation.memory.clear_voice(message.speaker)
            await self.send(VoiceCleared(message.speaker, cleared))
        else:
            self._voice = message

    async def _save_voice(self, message: s.VoiceMessage, data: bytes) -> None:
        audio = await checked_audio(data, self.service.limits, "Voice prompt")
        turn = self.conversation.memory.set_voice(message.speaker, (message.text or "").strip(), audio)
        await self.send(VoiceSaved(message.speaker, round(turn.duration_s, 3)))

    async def _cancel(self, request_id: str, played_ms: float | None = None) -> None:
        """Stop a request; with ``played_ms`` (barge-in) the conversation also keeps only what was heard of its
        reply, whether it is still in line or already ended."""
        job = self.live.get(request_id)
        if played_ms is not None:
            return await self.conversation.barge_in(request_id, played_ms, job)
        if job is None or not job.cancel():
            raise unknown_request(request_id)

    async def _write_replies(self) -> None:
        while True:
            job = await self.jobs.get()
            try:
                async for item in job.replies():
                    if job.finished and job.outbox.qsize() <= 1:  # its terminal reply: the id is free once read
                        self._forget(job)
                    await self.send(*item)
            finally:
                self._forget(job)
            await self.conversation.ended(job)  # a barge-in while it ran cuts it now


    def _forget(self, job: Job) -> None:
        if self.live.get(job.request_id) is job:
            del self.live[job.request_id]
        if self.streams.get(job.request_id) is not None and self.streams[job.request_id].job is job:
            del self.streams[job.request_id]
            self._ended_streams.append(job.request_id)


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
    try:
        service.admission.admit(client, address)
    except r.Refusal as refusal:
        await ws.accept()
        await ws.send_text(encode(failed(refusal)))
        return await ws.close(1013, "try again later")
    await ws.accept()
    owner = service.admission.owner(ws.headers, target)
    connection = Connection(service, ws, owner, service.admission.counted_as(owner, address))
    open_connections.add(connection)
    try:
        await connection.run(ws.query_params.get("session"))
    finally:
        open_connections.discard(connection)
