"""One port, two HTTP dialects: websockets for GETs and WebSocket handshakes, h11 for requests with a body.

websockets only ever parses a GET without a body (its opening handshake), so a
POST such as OpenAI's ``/v1/audio/speech`` cannot reach it.  ``FrontConnection``
is websockets' own per-socket connection class (the server creates one for
every accepted socket) that reads the request line first:

- a GET (a WebSocket upgrade or one of the plain GET endpoints) is replayed into
  websockets unchanged, so every WebSocket behaviour (limits, close codes,
  keepalive, backpressure) is exactly websockets';
- any other method becomes an ``HttpExchange``: h11 (the sans-I/O HTTP/1.1
  library under httpx and uvicorn) parses the request and frames the response,
  which the server's handler streams with chunked transfer encoding.

One request per exchange (the response says ``Connection: close``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

import h11
from websockets.asyncio.server import ServerConnection

log = logging.getLogger(__name__)
HEAD_TIMEOUT = 10.0  # seconds a client has to send its request head (websockets' own open_timeout)
MAX_HEAD = 16 * 1024
MAX_BODY = 256 * 1024  # the largest request body (the WebSocket's text-frame cap)


@dataclass
class HttpRequest:
    method: str
    target: str  # path with its query
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    peer: str

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


class HttpExchange:
    """One HTTP/1.1 request and its (possibly streamed) response over an asyncio transport."""

    def __init__(self, transport: asyncio.Transport, handler: Callable[[HttpRequest, "HttpExchange"], Awaitable],
                 peer: str) -> None:
        self.transport = transport
        self.handler = handler
        self.peer = peer
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._request: h11.Request | None = None
        self._body = bytearray()
        self._task: asyncio.Task | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self.closed = asyncio.Event()  # the client went away (or we closed)
        self.started = False  # the response head was sent

    # -- transport callbacks (from FrontConnection) -----------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._task is not None:
            return  # one request per exchange: anything after the body is ignored
        self._h11.receive_data(data)
        try:
            while (event := self._h11.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
                if isinstance(event, h11.Request):
                    self._request = event
                    length = dict(event.headers).get(b"content-length")
                    if length is not None and length.isdigit() and int(length) > MAX_BODY:
                        return self._refuse(413, "the request body is too large")
                elif isinstance(event, h11.Data):
                    self._body += event.data
                    if len(self._body) > MAX_BODY:
                        return self._refuse(413, "the request body is too large")
                elif isinstance(event, h11.EndOfMessage):
                    self._task = asyncio.get_running_loop().create_task(self._run())
                    return
                else:  # the client closed before the body was complete
                    self.transport.close()
                    return
        except h11.RemoteProtocolError as exc:
            self._refuse(exc.error_status_hint, f"malformed HTTP request: {exc}")

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        self._writable.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # a client that left cancels its request's generation

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- the response (for the handler) -----------------------------------------------------------------------
    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        """Send the response head; without a Content-Length the body is chunked."""
        self.started = True
        self._write(h11.Response(status_code=status, headers=[*headers, ("connection", "close")]))

    async def send(self, data: bytes) -> None:
        """Send part of the body, waiting while the client is slow to read (the transport's flow control)."""
        if data:
            self._write(h11.Data(data=data))
            await self._writable.wait()
        if self.closed.is_set():
            raise ConnectionResetError("the client went away")

    async def end(self) -> None:
        self._write(h11.EndOfMessage())
        self.transport.close()

    async def respond(self, status: int, body: bytes, content_type: str,
                      headers: list[tuple[str, str]] = ()) -> None:
        """A whole response at once."""
        await self.start(status, [("content-type", content_type), ("content-length", str(len(body))), *headers])
        await self.send(body)
        await self.end()

    def abort(self) -> None:
        """End a streamed response that cannot finish: no final chunk, so the client sees an incomplete body."""
        self.transport.abort()

    # -- internals -----------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        request = self._request
        headers: dict[str, str] = {}
        for name, value in request.headers:
            key = name.decode("latin-1")
            headers[key] = f"{headers[key]}, {value.decode('latin-1')}" if key in headers else value.decode("latin-1")
        try:
            await self.handler(HttpRequest(request.method.decode("latin-1"), request.target.decode("latin-1"),
                                           headers, bytes(self._body), self.peer), self)
        except (asyncio.CancelledError, ConnectionResetError):
            self.transport.abort()
        except Exception:  # a bug costs this request, never the server
            log.exception("HTTP %s %s failed", request.method, request.target)
            if not self.started:
                await self.respond(500, b'{"error": {"message": "Internal server error", "type": "server_error", '
                                        b'"param": null, "code": "internal_error"}}', "application/json")
            else:
                self.transport.abort()

    def _write(self, event) -> None:
        if not self.transport.is_closing():
            self.transport.write(self._h11.send(event))

    def _refuse(self, status: int, message: str) -> None:
        import json

        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": None}}).encode()
        if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                self._write(h11.Response(status_code=status, headers=[
                    ("content-type", "application/json"), ("content-length", str(len(body))),
                    ("connection", "close")]))
                self._write(h11.Data(data=body))
                self._write(h11.EndOfMessage())
            except h11.LocalProtocolError:
                pass
        self.transport.close()


class FrontConnection(ServerConnection):
    """websockets' connection for one socket, which first decides who speaks HTTP on it (see the module)."""

    http_handler: Callable[[HttpRequest, HttpExchange], Awaitable] | None = None  # set by ``front_for``

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._front_transport = transport
        self._head = bytearray()
        self._mode: str | None = None  # None until the request line is in: "ws" or "http"
        self._exchange: HttpExchange | None = None
        self._head_timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, transport.abort)

    def data_received(self, data: bytes) -> None:
        if self._mode == "ws":
            return super().data_received(data)
        if self._mode == "http":
            return self._exchange.data_received(data)
        self._head += data
        if b"\n" not in self._head:
            if len(self._head) > MAX_HEAD:
                self._front_transport.abort()
            return
        self._head_timer.cancel()
        head, self._head = bytes(self._head), bytearray()
        if head.startswith(b"GET ") or self.http_handler is None:
            self._mode = "ws"
            super().connection_made(self._front_transport)
            super().data_received(head)
        else:
            self._mode = "http"
            peer = (self._front_transport.get_extra_info("peername") or ("?",))[0]
            self._exchange = HttpExchange(self._front_transport, self.http_handler, peer)
            self._exchange.data_received(head)

    def eof_received(self) -> bool | None:
        if self._mode == "ws":
            return super().eof_received()
        if self._mode == "http":
            return self._exchange.eof_received()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._mode == "ws":
            return super().connection_lost(exc)
        self._head_timer.cancel()
        if self._mode == "http":
            self._exchange.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._mode == "ws":
            return super().pause_writing()
        if self._mode == "http":
            self._exchange.pause_writing()

    def resume_writing(self) -> None:
        if self._mode == "ws":
            return super().resume_writing()
        if self._mode == "http":
            self._exchange.resume_writing()


def front_for(handler: Callable[[HttpRequest, HttpExchange], Awaitable]) -> type[FrontConnection]:
    """A ``FrontConnection`` class whose non-GET requests go to ``handler`` (websockets' ``create_connection``)."""
    return type("Front", (FrontConnection,), {"http_handler": staticmethod(handler)})
