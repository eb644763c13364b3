"""The process's servers: the ASGI app on uvicorn (WebSocket, HTTP, page) on one port, Wyoming on its own.

``TTSServer`` holds the core ``Service`` and its listeners.  It listens at once,
loads engines in the background, and serves until ``shutdown`` (drain: refuse
the queue, let running requests finish, close WebSockets with 1001) or ``stop``.
uvicorn runs inside our event loop through its programmatic API
(``startup`` / ``shutdown``) so that signals and the drain stay ours.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

from ..core.jobs import EngineSlot, EngineState
from ..core import replies as r
from ..core.security import is_loopback, redact_logs
from ..core.service import Service
from .http import build_app
from .openai import PerAddress
from .transport import Connections, protocols
from .wyoming import WyomingApi

log = logging.getLogger(__name__)


class TTSServer:
    """Listens at once, loads engines in the background, serves until ``shutdown`` or ``stop``."""

    def __init__(self, *engines: EngineSlot | None, host: str = "127.0.0.1", port: int = 8765,
                 max_frame_bytes: int = 16 * 2**20, request_timeout: float = 30, write_timeout: float = 30,
                 wyoming_uri: str | None = None, wyoming_zeroconf: str | None = None, **core) -> None:
        self.service = service = Service(*engines, **core)
        self.host, self.port = host, port
        self.max_frame_bytes = max_frame_bytes
        self.wyoming = WyomingApi(service, wyoming_uri, wyoming_zeroconf) if wyoming_uri else None
        self.transports = Connections(service.admission.release)
        self.app = build_app(service, max_frame_bytes)
        self.app.state.connections = self.transports
        self.app.state.per_address = PerAddress()
        self.app.state.write_timeout = write_timeout
        http, ws = protocols(self.transports, request_timeout)
        self._config = uvicorn.Config(self.app, http=http, ws=ws, lifespan="off", ws_max_size=max_frame_bytes,
                                      ws_ping_interval=20, ws_ping_timeout=20, timeout_keep_alive=5,
                                      log_config=None, access_log=False, proxy_headers=False,
                                      server_header=False, timeout_graceful_shutdown=5)
        self._uvicorn: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._tasks: list[asyncio.Task] = []

    @property
    def connections(self) -> set:
        """The open WebSocket connections."""
        return self.app.state.websockets

    async def start(self) -> None:
        service = self.service
        await asyncio.to_thread(service.library.load)
        redact_logs(service.admission.gate.secrets)
        self._config.host, self._config.port = self.host, self.port
        self._socket = self._config.bind_socket()
        self.port = self._socket.getsockname()[1]
        self._uvicorn = uvicorn.Server(self._config)
        self._config.load()
        self._uvicorn.lifespan = self._config.lifespan_class(self._config)
        await self._uvicorn.startup(sockets=[self._socket])
        log.info("Listening on ws://%s:%d (HTTP on the same port)", self.host, self.port)
        if not service.admission.gate.requires_key and not is_loopback(self.host):
            log.warning("Listening on %s without an API key: anyone who can reach this port can use it "
                        "(set --api-key / TTS_API_KEY)", self.host)
        if self.wyoming is not None:
            await self.wyoming.start()
        self._tasks.append(asyncio.create_task(service.scheduler.run(), name="scheduler"))
        self._tasks.append(asyncio.create_task(service.speech.load(), name="load-stt"))
        self._tasks.append(asyncio.create_task(service.sessions.sweep_every(service.session_sweep_seconds),
                                               name="session-sweep"))
        for slot in service.scheduler.slots.values():
            if slot.state == EngineState.LOADING:
                self._tasks.append(asyncio.create_task(self._load(slot), name=f"load-{slot.name}"))

    async def _load(self, slot: EngineSlot) -> None:
        await slot.load()
        self.service.scheduler.wake()
        log.info("Engines: %s", self.service.serving()[1])

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, refuse the queue, let running requests finish for up to ``grace`` s, then close."""
        scheduler = self.service.scheduler
        self.service.admission.draining = True
        if self._uvicorn is not None:
            for server in self._uvicorn.servers:
                server.close()  # no new connections; open ones carry on
        refused = scheduler.refuse_queued(r.ErrorCode.SHUTTING_DOWN, "The server is shutting down")
        for connection in self.connections:  # and what waits for its text, in no queue yet
            connection.refuse_unqueued(r.shutting_down())
        if self.wyoming is not None:
            self.wyoming.refuse_unqueued(r.shutting_down())
        log.info("Shutting down: %d queued requests refused, waiting up to %g s for %d running", refused, grace,
                 len(scheduler.running))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while scheduler.running and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for job in list(scheduler.running):
            job.cancel()
        while (any(c.live for c in self.connections) or (self.wyoming and self.wyoming.live())) \
                and loop.time() < deadline + 2:
            await asyncio.sleep(0.05)  # let the writers deliver the last replies
        await asyncio.gather(*(c.close(1001, "server shutting down") for c in list(self.connections)),
                             return_exceptions=True)
        await self.stop()

    async def stop(self) -> None:
        if self.wyoming is not None:
            await self.wyoming.stop()
        if self._uvicorn is not None:
            self._uvicorn.force_exit = True  # open connections are closed now, not waited for
            await self._uvicorn.shutdown(sockets=[self._socket])
            self._uvicorn = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        service = self.service
        await service.close_background()
        if service.chat is not None:  # its pooled connections belong to this loop: closed here, not by the collector
            await service.chat.close()
        service.scheduler.close()
        await asyncio.gather(*(slot.close() for slot in service.scheduler.slots.values()))  # after their workers end
        service.sessions.close()
        for thread in (service.turns.thread, service.speech.thread):  # what waits there is for clients that are gone
            thread.shutdown(wait=False, cancel_futures=True)
