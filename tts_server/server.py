"""The asyncio server: WebSocket connections, plain HTTP GETs and OpenAI's POST on one port (Wyoming on its own).

``front.FrontConnection`` sorts each new connection: GETs and WebSocket
handshakes go to websockets (this module), requests with a body to
``openai_api``.

Each connection runs two tasks, in the manner of wyoming-piper's handler:

- the *reader* parses every frame (``protocol``), answers bad input at once
  with a JSON error, and hands synthesis requests to the ``Scheduler``;
- the *writer* sends each accepted job's replies in the order the requests
  arrived, so answers on one connection never overtake each other.

Rejections (validation errors, ``busy``, ``loading`` notices) are sent at once
rather than queued behind audio; they carry the ``request_id`` they answer.
Closing a connection cancels all of its queued and running jobs.
"""

from __future__ import annotations

import asyncio
import http
import logging
import socket
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from . import http_api
from .front import front_for
from .openai_api import OpenAIApi
from .wyoming_api import WyomingApi
from . import protocol as p
from .context import Conversation, ReferenceLibrary
from .metrics import Metrics
from .references import ReferenceError
from .references.quality import check_voice_prompt
from .jobs import END, Busy, EngineSlot, Job
from .cache import AudioCache
from .routing import Chain
from .scheduler import Scheduler
from .security import ConnectionLimits, Gate, ProxyTrust, RateLimiter, RedactingLogger, is_loopback

log = logging.getLogger(__name__)
WEBSOCKET_PATHS = ("/", "/ws")
SEND_BUFFER_BYTES = 256 * 1024  # ~2.7 s of 24 kHz s16 audio; plenty for any link that keeps up


class Connection:
    """State of one WebSocket client: its jobs in arrival order, its conversation, a send lock."""

    def __init__(self, server: "TTSServer", ws: ServerConnection) -> None:
        self.server = server
        self.ws = ws
        self.jobs: asyncio.Queue[Job] = asyncio.Queue()
        self.live: dict[str, Job] = {}
        self.conversation = Conversation(server.library, server.max_context_turns)
        self._voice: p.VoiceRequest | None = None  # a voice message waiting for its binary frame
        # One loading notice per connection: a client of the original protocol reads one notice, then the reply.
        self._told_loading = False
        self._rate = RateLimiter(server.rate_limit)
        self._send_lock = asyncio.Lock()

    async def send(self, *frames: Any) -> None:
        """Send frames back to back (metadata + audio must not be split by another reply)."""
        async with self._send_lock:
            for frame in frames:
                await self.ws.send(p.encode(frame) if isinstance(frame, dict) else frame)

    async def run(self) -> None:
        notice = self.server.loading_notice()
        if notice:
            self._told_loading = True
            await self.send(p.loading_reply(notice))
        writer = asyncio.create_task(self._write_replies())
        try:
            async for raw in self.ws:
                await self._handle(raw)
        except ConnectionClosed:
            pass
        finally:
            for job in list(self.live.values()):
                job.cancel()
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def _handle(self, raw: str | bytes) -> None:
        try:
            voice, self._voice = self._voice, None
            if voice is not None:
                if isinstance(raw, bytes):
                    return await self._save_voice(voice, raw)
                await self.send(p.error_reply(p.ErrorCode.INVALID_REQUEST,
                                              "Voice upload abandoned: the voice message must be followed by one "
                                              "binary frame holding the audio file"))
            message = p.parse_message(raw, self.server.limits())
            if isinstance(message, (p.SynthesisRequest, p.VoiceRequest)) and not self._rate.allow():
                raise p.rate_limited(self.server.rate_limit, getattr(message, "request_id", None))
            if isinstance(message, p.SynthesisRequest):
                await self._synthesize(message)
            elif isinstance(message, p.CancelRequest):
                await self._cancel(message.request_id)
            elif isinstance(message, p.VoiceRequest):
                await self._voice_message(message)
            else:
                self.conversation.reset()
                await self.send({"status": "reset"})
        except p.ProtocolError as exc:
            await self.send(exc.reply())
        except ConnectionClosed:
            raise
        except Exception:  # a bug must cost one reply, not the connection
            log.exception("internal error while handling a message")
            await self.send(p.error_reply(p.ErrorCode.INTERNAL_ERROR, "Internal server error"))

    async def _synthesize(self, request: p.SynthesisRequest) -> None:
        if self.server.draining:
            raise p.shutting_down(request.request_id)
        if request.request_id in self.live:
            raise p.ProtocolError(p.ErrorCode.INVALID_REQUEST,
                                  f"request_id {request.request_id!r} is already in use on this connection",
                                  request.request_id)
        if sum(not job.finished for job in self.live.values()) >= self.server.max_queued_per_connection:
            raise p.too_many_queued(self.server.max_queued_per_connection, request.request_id)
        job = Job(request, asyncio.get_running_loop(), prepare=lambda j: self.conversation.prompt_for(j.task),
                  on_success=self._remember)
        job.owner = self
        job.cache_salt = "websocket"  # with context off its prompt is the text (and emotion clip) alone
        try:
            notice = self.server.scheduler.submit(job)
        except Busy as exc:
            raise p.ProtocolError(p.ErrorCode.BUSY, str(exc), request.request_id) from None
        self.live[request.request_id] = job
        self.jobs.put_nowait(job)
        if notice and not self._told_loading:
            self._told_loading = True
            await self.send(p.loading_reply(notice, request.request_id))

    def _remember(self, job: Job) -> None:
        """After a success: extend the history, and pin the speaker's voice if it has none yet."""
        self.conversation.remember(job.task)
        speaker, produced = job.request.speaker, list(job.task.produced)
        library = self.server.library
        if job.request.context and speaker not in self.conversation.voices and library.wants_pin(speaker, produced):
            self.server.background(asyncio.to_thread(library.pin, speaker, produced))

    async def _voice_message(self, message: p.VoiceRequest) -> None:
        if message.clear:
            cleared = self.conversation.clear_voice(message.speaker)
            await self.send({"status": "voice_cleared", "speaker": message.speaker, "cleared": cleared})
        else:
            self._voice = message

    async def _save_voice(self, message: p.VoiceRequest, data: bytes) -> None:
        try:
            audio = await asyncio.to_thread(check_voice_prompt, data, self.server.max_voice_bytes,
                                            self.server.max_voice_seconds)
        except ReferenceError as exc:
            raise p.ProtocolError(p.ErrorCode.INVALID_VOICE, f"Voice prompt rejected: {exc}") from None
        turn = self.conversation.set_voice(message.speaker, message.text or "", audio)
        await self.send({"status": "voice_saved", "speaker": message.speaker, "duration_s": round(turn.duration_s, 3)})

    async def _cancel(self, request_id: str) -> None:
        job = self.live.get(request_id)
        if job is None or not job.cancel():
            raise p.ProtocolError(p.ErrorCode.UNKNOWN_REQUEST,
                                  f"No queued or running request {request_id!r} on this connection", request_id)

    async def _write_replies(self) -> None:
        while True:
            job = await self.jobs.get()
            try:
                while (item := await job.outbox.get()) is not END:
                    await self.send(*item)
                    job.unsent_bytes(-sum(len(f) for f in item if isinstance(f, bytes)))
            finally:
                self.live.pop(job.request_id, None)


class TTSServer:
    """Listens at once, loads engines in the background, serves until ``stop``."""

    def __init__(self, *engines: EngineSlot | None, overflow_engine: str | None = None, cache_bytes: int = 0,
                 engine_costs: dict[str, float] | None = None, host: str = "127.0.0.1", port: int = 8765,
                 max_queue: int = 32,
                 max_text_chars: int = 4000, sample_rate: int = 24000, max_frame_bytes: int = 16 * 2**20,
                 stream_buffer_seconds: float = 30, library: ReferenceLibrary | None = None,
                 max_context_turns: int = 8, gate: Gate | None = None, max_connections: int = 256,
                 max_connections_per_address: int = 16, rate_limit: int = 120, max_queued_per_connection: int = 8,
                 max_voice_bytes: int = 10 * 1024 * 1024, max_voice_seconds: float = 30,
                 generation_timeout: float = 120, trusted_proxies: tuple[str, ...] = (),
                 wyoming_uri: str | None = None, wyoming_zeroconf: str | None = None) -> None:
        self.host, self.port = host, port
        self.wyoming = WyomingApi(self, wyoming_uri, wyoming_zeroconf) if wyoming_uri else None
        self.proxies = ProxyTrust(trusted_proxies)
        self.gate = gate or Gate()
        self.connection_limits = ConnectionLimits(max_connections, max_connections_per_address)
        self.rate_limit = rate_limit
        self.max_queued_per_connection = max_queued_per_connection
        self.max_voice_bytes, self.max_voice_seconds = max_voice_bytes, max_voice_seconds
        self.draining = False
        self.library = library or ReferenceLibrary(None)
        self.max_context_turns = max_context_turns
        self._background: set[asyncio.Task] = set()
        self.max_text_chars = max_text_chars
        self.max_frame_bytes = max_frame_bytes
        self.metrics = Metrics(engine_costs)
        chain = Chain([slot for slot in engines if slot is not None], overflow_engine)
        self.scheduler = Scheduler(chain, max_queue=max_queue, sample_rate=sample_rate, metrics=self.metrics,
                                   stream_buffer_seconds=stream_buffer_seconds, generation_timeout=generation_timeout,
                                   cache=AudioCache(cache_bytes))
        self.connections: set[Connection] = set()
        self._server: Server | None = None
        self._tasks: list[asyncio.Task] = []

    def limits(self) -> p.Limits:
        return p.Limits(max_text_chars=self.max_text_chars, emotions=tuple(sorted(self.library.emotions)))

    def background(self, work) -> None:
        """Run ``work`` (a coroutine) without awaiting it, keeping a reference until it ends."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def loading_notice(self) -> str | None:
        primary = self.scheduler.primary
        if primary.state == "loading":
            return f"The {primary.name} model is loading; requests are queued until it is ready"
        return None

    def serving(self) -> tuple[str | None, str]:
        """Which engine answers a request without ``engine`` now, and why, in one sentence."""
        why: list[str] = []
        for slot in self.scheduler.chain.slots:
            if slot.state == "ready":
                return slot.name, "; ".join([*why, f"serving with {_label(slot)}"])
            if slot.state == "loading":
                return None, "; ".join([*why, f"{_label(slot)} is loading; requests wait for it"])
            why.append(f"{_label(slot)} unavailable: {slot.reason}")
        return None, "; ".join(why)

    def refresh_gauges(self) -> None:
        self.metrics.queue_depth.set(self.scheduler.depth)
        self.metrics.connections.set(len(self.connections))
        for name, slot in self.scheduler.slots.items():
            self.metrics.set_engine_state(name, slot.state)
        cache = self.scheduler.cache
        self.metrics.cache_bytes.set(cache.bytes)
        self.metrics.cache_entries.set(len(cache))

    async def start(self) -> None:
        await asyncio.to_thread(self.library.load)
        self._server = await serve(self._handle, self.host, self.port, process_request=self._process_request,
                                   max_size=self.max_frame_bytes, create_connection=front_for(OpenAIApi(self)),
                                   logger=RedactingLogger(logging.getLogger("websockets.server"), self.gate.secrets))
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("Listening on ws://%s:%d", self.host, self.port)
        if not self.gate.requires_key and not is_loopback(self.host):
            log.warning("Listening on %s without an API key: anyone who can reach this port can use it "
                        "(set --api-key / TTS_API_KEY)", self.host)
        if self.wyoming is not None:
            await self.wyoming.start()
        self._tasks.append(asyncio.create_task(self.scheduler.run(), name="scheduler"))
        for slot in self.scheduler.slots.values():
            if slot.state == "loading":
                self._tasks.append(asyncio.create_task(self._load(slot), name=f"load-{slot.name}"))

    async def _load(self, slot: EngineSlot) -> None:
        await slot.load()
        self.scheduler.wake()
        log.info("Engines: %s", self.serving()[1])

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, refuse the queue, let running requests finish for up to ``grace`` s, then close."""
        self.draining = True
        if self._server is not None:
            self._server.close(close_connections=False)
        refused = self.scheduler.refuse_queued(p.ErrorCode.SHUTTING_DOWN, "The server is shutting down")
        log.info("Shutting down: %d queued requests refused, waiting up to %g s for %d running", refused, grace,
                 len(self.scheduler.running))
        deadline = asyncio.get_running_loop().time() + grace
        while self.scheduler.running and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for job in list(self.scheduler.running):
            job.cancel()
        while (any(c.live for c in self.connections) or (self.wyoming and self.wyoming.live())) \
                and asyncio.get_running_loop().time() < deadline + 2:
            await asyncio.sleep(0.05)  # let the writers deliver the last replies
        await asyncio.gather(*(c.ws.close(1001, "server shutting down") for c in list(self.connections)),
                             return_exceptions=True)
        await self.stop()

    async def stop(self) -> None:
        if self.wyoming is not None:
            await self.wyoming.stop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        self.scheduler.close()

    async def _handle(self, ws: ServerConnection) -> None:
        address = self.proxies.client((ws.remote_address or ("?",))[0], ws.request.headers)
        refusal = self.admit_connection(address)
        if refusal is not None:
            await ws.send(p.encode(refusal.reply()))
            await ws.close(1013, "try again later")
            return
        sock = ws.transport.get_extra_info("socket")
        if sock is not None:  # bound kernel buffering so a stalled reader is noticed (client_too_slow)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        connection = Connection(self, ws)
        self.connections.add(connection)
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)
            self.connection_limits.release(address)

    def admit_connection(self, address: str) -> p.ProtocolError | None:
        """Count a new connection from ``address`` (any interface), or say why it is refused; admitted ones
        are released with ``connection_limits.release(address)``."""
        if self.draining:
            return p.ProtocolError(p.ErrorCode.SHUTTING_DOWN, "The server is shutting down")
        refusal = self.connection_limits.admit(address)
        return None if refusal is None else p.ProtocolError(p.ErrorCode.TOO_MANY_CONNECTIONS, refusal)

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        upgrade = "websocket" in request.headers.get("Upgrade", "").lower()
        verdict = self.gate.check(request.headers, request.path, upgrade)
        if verdict is not None:
            return http_api.text_response(http.HTTPStatus(verdict.status), verdict.reason)
        path = request.path.split("?", 1)[0]
        if upgrade and path in WEBSOCKET_PATHS:
            return None
        if path == "/ws":
            return http_api.text_response(http.HTTPStatus.UPGRADE_REQUIRED,
                                          "This is a WebSocket endpoint: connect with a WebSocket client.\n")
        return http_api.respond(self, path, request.path.partition("?")[2])


def _label(slot: EngineSlot) -> str:
    described = slot.engine.describe()
    name = {"csm": "CSM-1B"}.get(slot.name, slot.name)
    voice = described.get("voice")
    return f"{name} {voice}" if voice else name
