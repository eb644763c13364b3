"""uvicorn's own protocol classes with the guards a public server needs and uvicorn lacks.

- A deadline for receiving a whole request, head and body (``--request-timeout``):
  uvicorn's ``timeout_keep_alive`` only runs between requests and every byte of
  a trickled head would reset it (uvicorn issue 157).  A request not complete
  in time gets 408 and the connection is closed.
- A bounded kernel send buffer, so a client that stops reading is noticed
  within seconds of audio (``client_too_slow``) instead of megabytes later,
  and TCP_NODELAY (see ``_tune_socket``).
- ``Connections``: every open TCP connection by its client ``(host, port)``
  (the ASGI scope's ``client``), so the app can abort one (a stalled reader)
  and its admission is released when it closes, whatever it spoke (HTTP,
  WebSocket after the upgrade).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import get_remote_addr
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

log = logging.getLogger(__name__)
SEND_BUFFER_BYTES = 256 * 1024  # ~2.7 s of 24 kHz s16 audio; plenty for any link that keeps up
_RECEIVING = (h11.IDLE, h11.SEND_BODY)  # the client is still sending its request
_PEER_CLOSED = (7, 8)  # Linux TCP states: CLOSE (reset), CLOSE_WAIT (its FIN arrived: it sends nothing more)


class Connections:
    """Open connections by client address and port; ``release`` is called once for each when it closes."""

    def __init__(self, release: Callable[[tuple], None]) -> None:
        self._release = release
        self._transports: dict[tuple, asyncio.Transport] = {}

    def opened(self, client: tuple | None, transport: asyncio.Transport) -> None:
        if client is not None:
            self._transports[client] = transport

    def closed(self, client: tuple | None) -> None:
        if client is not None and self._transports.pop(client, None) is not None:
            self._release(client)

    def gone(self, client: tuple | None) -> bool:
        """Whether the client has closed or reset its TCP connection while what it sent before is still being read:
        reading is paused while the app works through earlier frames, so ``connection_lost`` comes only once they are
        all read.  Its kernel state tells at once (Linux: ``TCP_INFO``; elsewhere always False)."""
        transport = self._transports.get(tuple(client)) if client else None
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or not hasattr(socket, "TCP_INFO"):
            return False
        try:
            return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] in _PEER_CLOSED
        except OSError:
            return False

    def abort(self, client: tuple | None) -> None:
        """Drop a connection now, unsent data and all (a client that stopped reading)."""
        transport = self._transports.get(tuple(client)) if client else None
        if transport is not None:
            transport.abort()

    def __len__(self) -> int:
        return len(self._transports)


def _tune_socket(transport: asyncio.BaseTransport) -> None:
    """A bounded send buffer, and no Nagle delay: a small reply written right after another must not wait for the
    client's delayed ACK (~40 ms). asyncio sets TCP_NODELAY itself only on sockets made with proto IPPROTO_TCP,
    which a listening socket bound by ``uvicorn.Config.bind_socket`` is not."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class GuardedWebSocket(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, known to ``tracked`` while it is open (set per server by ``protocols``)."""

    tracked: Connections

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.tracked.opened(self.client, transport)

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        self.tracked.closed(self.client)


class GuardedHttp(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each whole request (``request_timeout`` s), known to
    ``tracked`` until it closes or becomes a WebSocket (both set per server by ``protocols``)."""

    tracked: Connections
    request_timeout: float

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        _tune_socket(transport)
        self.tracked.opened(get_remote_addr(transport), transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)
        if not getattr(self, "_upgraded", False):
            self.tracked.closed(self.client)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state not in _RECEIVING:
            self._disarm()  # the whole request is in (or the connection is done)

    def handle_websocket_upgrade(self, event) -> None:
        self._disarm()
        self._upgraded = True  # the WebSocket protocol owns the connection (and its release) from here
        super().handle_websocket_upgrade(event)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            body = json.dumps({"error": {"message": f"The request was not received within {self.request_timeout:g} s",
                                         "type": "invalid_request_error", "param": None,
                                         "code": "request_timeout"}}).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        log.info("Closed a connection from %s: its request took more than %g s to arrive",
                 (self.client or ("?",))[0], self.request_timeout)
        self.transport.close()


def protocols(connections: Connections, request_timeout: float) -> tuple[type, type]:
    """The HTTP and WebSocket protocol classes for ``uvicorn.Config(http=..., ws=...)``: uvicorn makes one
    instance per connection and passes it no arguments of ours, so each server gets subclasses bound to its own
    ``connections`` and timeout (``tracked``: uvicorn's protocols already use ``self.connections``)."""
    http = type("GuardedHttp", (GuardedHttp,), {"tracked": connections, "request_timeout": request_timeout})
    ws = type("GuardedWebSocket", (GuardedWebSocket,), {"tracked": connections})
    return http, ws
