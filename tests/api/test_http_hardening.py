"""The HTTP side of the one port as a hostile client and a load balancer find it: slow heads and bodies, stalled
readers, admission, keys in logs, CORS preflights, HEAD, 100-continue, keep-alive, sample rates, OpenAI's error
shapes, and the OpenAPI schema.  Each test drives the real server over a loopback socket."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import logging
import socket
import threading
import time

import av
import pytest
import websockets

from conftest import collect, piper_slot, reply_json, running_server, url
from tts_server.core.security import Gate

SPEECH = {"model": "piper", "voice": "alloy", "input": "Hello there, this is a test."}
KEY = "sk-hardening-Secret-0123456789"


def raw_exchange(port: int, data: bytes, timeout: float = 10, half_close: bool = False) -> bytes:
    """Send ``data`` on a fresh socket (then, with ``half_close``, say nothing more is coming) and read until the
    server closes it (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return bytes(received)


def post_head(body: bytes, extra: str = "") -> bytes:
    return (f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode()


async def wait_until(condition, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


async def test_a_trickled_head_gets_408_and_is_closed_at_the_request_deadline():
    async with running_server(piper_slot(), request_timeout=2) as server:
        def trickle() -> tuple[bytes, int]:
            sent = 0
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\n")
                try:
                    for line in [b"Host: x\r\n"] + [b"X-Slow-%d: 1\r\n" % i for i in range(20)]:
                        time.sleep(0.5)  # each line well inside uvicorn's keep-alive timeout, which it resets
                        sock.sendall(line)
                        sent += 1
                    return sock.recv(1000), sent
                except (BrokenPipeError, ConnectionResetError):
                    return b"", sent
        answer, sent = await asyncio.to_thread(trickle)
        assert sent < 20  # the server hung up long before the head was done
        assert answer in (b"",) or answer.startswith(b"HTTP/1.1 408")
        assert await wait_until(lambda: len(server.transports) == 0)


async def test_a_body_that_never_comes_gets_408_and_the_connection_is_closed():
    async with running_server(piper_slot(), request_timeout=2) as server:
        answer = await asyncio.to_thread(raw_exchange, server.port, post_head(b"x" * 100), 15)
        assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
        assert await wait_until(lambda: len(server.transports) == 0)


async def test_a_client_that_never_reads_its_stream_is_dropped_and_its_socket_closed():
    long_text = " ".join(["This sentence is here to make a long reply that nobody will ever read."] * 60)
    async with running_server(piper_slot(), stream_buffer_seconds=1, write_timeout=3) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's writes stall
        sock.connect(("127.0.0.1", server.port))
        body = json.dumps({**SPEECH, "input": long_text, "response_format": "pcm"}).encode()
        sock.sendall(post_head(body) + body)
        try:
            assert await wait_until(lambda: len(server.transports) == 0, 60), "the stalled socket is still open"
            assert await wait_until(lambda: not server.service.scheduler.running)
        finally:
            sock.close()


async def test_http_connections_count_against_the_per_address_limit_like_websockets():
    async with running_server(piper_slot(), max_connections_per_address=2, request_timeout=30) as server:
        stalled = []
        for _ in range(10):  # a Content-Length and no body: each one is an admitted request waiting for its body
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(post_head(b"x" * 100))
            stalled.append(sock)
        try:
            assert await wait_until(lambda: server.service.admission.open_connections == 2)
            refused = stalled[-1].recv(2000)
            assert refused.startswith(b"HTTP/1.1 503") and b"too_many_connections" in refused
            async with websockets.connect(url(server)) as ws:
                reply, _, _ = await collect(ws)
                assert reply["code"] == "too_many_connections"
            assert ws.close_code == 1013
        finally:
            for sock in stalled:
                sock.close()
        assert await wait_until(lambda: server.service.admission.open_connections == 0)
        async with websockets.connect(url(server)) as ws:  # released: admitted again
            await ws.send(json.dumps({"type": "reset"}))
            assert reply_json(await ws.recv()) == {"status": "reset"}


async def test_no_api_key_reaches_the_log_on_any_path(caplog):
    caplog.set_level(logging.DEBUG)
    async with running_server(piper_slot(), gate=Gate((KEY,))) as server:
        for request in (f"HEAD /v1/models?api_key={KEY} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                        f"GET /nowhere?api_key={KEY} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                        f"GET /v1/info HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                        "Connection: close\r\n\r\n"):
            answer = await asyncio.to_thread(raw_exchange, server.port, request.encode())
            assert answer.startswith(b"HTTP/1.1 ")
        async with websockets.connect(f"{url(server)}/ws?api_key={KEY}") as ws:
            await ws.send(json.dumps({"type": "reset"}))
            await ws.recv()
    assert "api_key=***" in caplog.text  # the WebSocket's accepted line, redacted
    assert KEY not in caplog.text


async def test_a_cors_preflight_needs_no_key_and_allows_the_authorization_header():
    async with running_server(piper_slot(), gate=Gate((KEY,))) as server:
        def preflight() -> tuple[int, dict]:
            with contextlib.closing(http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)) as conn:
                conn.request("OPTIONS", "/v1/audio/speech", headers={
                    "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization, content-type"})
                response = conn.getresponse()
                response.read()
                return response.status, {k.lower(): v for k, v in response.getheaders()}
        status, headers = await asyncio.to_thread(preflight)
        assert status == 200
        assert "authorization" in headers["access-control-allow-headers"].lower()
        assert "POST" in headers["access-control-allow-methods"]


async def test_opus_works_at_a_sample_rate_libopus_refuses():
    async with running_server(piper_slot(), sample_rate=22050) as server:
        def fetch() -> tuple[int, dict, bytes]:
            with contextlib.closing(http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)) as conn:
                conn.request("POST", "/v1/audio/speech", json.dumps({**SPEECH, "response_format": "opus"}),
                             {"Content-Type": "application/json"})
                response = conn.getresponse()
                return response.status, dict(response.getheaders()), response.read()
        status, headers, body = await asyncio.to_thread(fetch)
        assert status == 200, body[:300]
        assert headers["x-sample-rate"] == "24000"  # the nearest rate above 22050 that Opus takes
        with av.open(io.BytesIO(body)) as container:
            frames = [f for f in container.decode(audio=0)]
        assert sum(f.samples for f in frames) / frames[0].sample_rate > 0.5


async def test_head_answers_every_get_endpoint_and_404_and_405_carry_codes_and_the_allowed_methods(caplog):
    caplog.set_level(logging.INFO)
    async with running_server(piper_slot()) as server:
        for path in ("/health", "/ready", "/v1/models", "/v1/info", "/metrics", "/v1/audio/voices", "/"):
            answer = await asyncio.to_thread(
                raw_exchange, server.port, f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), (path, head)
            assert body == b"", path
        answer = await asyncio.to_thread(
            raw_exchange, server.port, b"GET /v1/audio/speech HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 405") and b"allow: post" in head.lower()
        assert json.loads(body)["error"]["code"] == "method_not_allowed"
        answer = await asyncio.to_thread(
            raw_exchange, server.port, b"GET /v1/nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 404") and json.loads(body)["error"]["code"] == "not_found"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_expect_100_continue_is_answered_before_the_body_is_sent():
    async with running_server(piper_slot()) as server:
        def exchange() -> tuple[bytes, bytes]:
            body = json.dumps({**SPEECH, "response_format": "wav"}).encode()
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(post_head(body, "Expect: 100-continue\r\nConnection: close\r\n"))
                interim = sock.recv(100)  # nothing of the body has been sent yet
                sock.sendall(body)
                rest = bytearray()
                while chunk := sock.recv(65536):
                    rest += chunk
            return interim, bytes(rest)
        interim, rest = await asyncio.to_thread(exchange)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        assert rest.startswith(b"HTTP/1.1 200") and b"RIFF" in rest


async def test_two_requests_share_one_kept_alive_connection():
    async with running_server(piper_slot()) as server:
        def twice() -> list[tuple[int, int]]:
            seen = []
            with contextlib.closing(http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)) as conn:
                for text in ("First request.", "Second request."):
                    conn.request("POST", "/v1/audio/speech", json.dumps({**SPEECH, "input": text,
                                                                        "response_format": "wav"}),
                                 {"Content-Type": "application/json"})
                    response = conn.getresponse()
                    assert response.read()[:4] == b"RIFF"
                    seen.append((response.status, conn.sock.getsockname()[1]))
            return seen
        (first, port_a), (second, port_b) = await asyncio.to_thread(twice)
        assert first == second == 200 and port_a == port_b  # the same socket carried both


async def test_http_encoding_runs_off_the_event_loop(monkeypatch):
    from tts_server.audio import codec

    threads: set[int] = set()
    original = codec.StreamEncoder.encode

    def recording(self, pcm: bytes) -> bytes:
        threads.add(threading.get_ident())
        return original(self, pcm)

    monkeypatch.setattr(codec.StreamEncoder, "encode", recording)
    async with running_server(piper_slot()) as server:
        loop_thread = threading.get_ident()
        def fetch() -> int:
            with contextlib.closing(http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)) as conn:
                conn.request("POST", "/v1/audio/speech", json.dumps({**SPEECH, "response_format": "mp3"}),
                             {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                return response.status
        assert await asyncio.to_thread(fetch) == 200
    assert threads and loop_thread not in threads


async def test_v1_errors_come_in_openai_shape_with_the_key_rule_too():
    async with running_server(piper_slot(), gate=Gate((KEY,))) as server:
        answer = await asyncio.to_thread(
            raw_exchange, server.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401")
        error = json.loads(body)["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"


async def test_openapi_describes_the_speech_endpoint_with_our_extra_fields():
    async with running_server(piper_slot()) as server:
        def fetch() -> dict:
            with contextlib.closing(http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)) as conn:
                conn.request("GET", "/openapi.json")
                return json.loads(conn.getresponse().read())
        schema = await asyncio.to_thread(fetch)
    operation = schema["paths"]["/v1/audio/speech"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    fields = set(body["properties"])
    assert {"model", "input", "voice", "response_format", "speed", "stream_format"} <= fields  # OpenAI's
    assert {"seed", "emotion", "language", "sample_rate", "context", "speaker"} <= fields  # ours
    assert body["required"] == ["input", "voice"]
    assert "/v1/models" in schema["paths"] and "/health" in schema["paths"]


pytestmark = pytest.mark.timeout(180)
