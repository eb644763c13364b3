"""API keys, origins, connection/rate/queue limits, and secrets kept out of every output."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from conftest import ahttp_get, collect, csm_slot, recv_json, reply_json, running_server, url
from tts_server.core.security import Gate, RateLimiter

KEYS = ("key-one-7f3a9c", "key-two-51b2e0")
SHORT = {"max_audio_length_ms": 160}




async def test_api_key_is_required_on_websocket_and_http_except_health(tiny_model_dir, caplog):
    caplog.set_level(logging.DEBUG)
    async with running_server(csm_slot(tiny_model_dir), gate=Gate(KEYS)) as server:
        for headers, path in [({}, "/"), ({"Authorization": "Bearer wrong"}, "/"), ({}, "/?api_key=nope")]:
            with pytest.raises(InvalidStatus) as info:
                await websockets.connect(url(server) + path[1:], additional_headers=headers)
            assert info.value.response.status_code == 401
        async with websockets.connect(url(server), additional_headers={"Authorization": f"Bearer {KEYS[1]}"}) as ws:
            await ws.send(json.dumps({"text": "Authorised", **SHORT}))
            assert (await collect(ws))[0]["status"] == "success"
        async with websockets.connect(f"{url(server)}/ws?api_key={KEYS[0]}") as ws:
            await ws.send(json.dumps({"text": "Browser style", **SHORT}))
            assert (await collect(ws))[0]["status"] == "success"
        assert (await ahttp_get(server.port, "/health"))[0] == 200
        assert (await ahttp_get(server.port, "/static/app.js"))[0] == 200
        assert (await ahttp_get(server.port, "/"))[0] == 200  # the page itself, which then asks for a key
        for path in ("/v1/info", "/metrics", "/ready"):
            assert (await ahttp_get(server.port, path))[0] == 401, path
        status, info = await ahttp_get(server.port, "/v1/info", {"Authorization": f"Bearer {KEYS[0]}"})
        _, metrics = await ahttp_get(server.port, f"/metrics?api_key={KEYS[1]}")
        _, page = await ahttp_get(server.port, f"/?api_key={KEYS[1]}")
    assert status == 200 and "<title>" in page
    server_logs = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("websockets.client"))
    assert "/ws?api_key=***" in server_logs  # uvicorn logs the WebSocket's path with its query: redacted
    for key in KEYS:
        assert key not in info and key not in metrics and key not in server_logs


async def test_foreign_origins_are_refused_and_own_or_allowed_origins_pass(tiny_model_dir):
    gate = Gate(allowed_origins=("https://app.example.com",))
    async with running_server(csm_slot(tiny_model_dir), gate=gate) as server:
        with pytest.raises(InvalidStatus) as info:
            await websockets.connect(url(server), origin="https://evil.example.net")
        assert info.value.response.status_code == 403
        for origin in (f"http://127.0.0.1:{server.port}", "https://app.example.com", None):
            async with websockets.connect(url(server), origin=origin) as ws:
                await ws.send(json.dumps({"type": "reset"}))
                assert await recv_json(ws) == {"status": "reset"}


async def test_listening_publicly_without_a_key_warns_once(tiny_model_dir, caplog):
    from tts_server.api.server import TTSServer

    caplog.set_level(logging.WARNING)
    server = TTSServer(csm_slot(tiny_model_dir), host="0.0.0.0", port=0)
    await server.start()
    await server.stop()
    warnings = [r for r in caplog.records if "without an API key" in r.getMessage()]
    assert len(warnings) == 1


async def test_connection_limits_refuse_with_a_code_and_spare_the_others(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir), max_connections_per_address=2) as server:
        first = await websockets.connect(url(server))
        second = await websockets.connect(url(server))
        third = await websockets.connect(url(server))
        refusal = await recv_json(third)
        await asyncio.wait_for(third.wait_closed(), 10)
        assert refusal["code"] == "too_many_connections" and third.close_code == 1013
        await first.send(json.dumps({"text": "Still fine", **SHORT}))
        assert (await collect(first))[0]["status"] == "success"
        await second.close()
        await asyncio.sleep(0.2)
        async with websockets.connect(url(server)) as again:  # a freed slot is usable at once
            await again.send(json.dumps({"type": "reset"}))
            assert (await recv_json(again))["status"] == "reset"
        await first.close()
    async with running_server(csm_slot(tiny_model_dir), max_connections=1) as server:
        async with websockets.connect(url(server)):
            async with websockets.connect(url(server)) as extra:
                assert (await recv_json(extra))["code"] == "too_many_connections"


async def test_request_rate_limit_per_connection(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir), rate_limit=3) as server:
        async with websockets.connect(url(server)) as ws:
            for i in range(4):
                await ws.send(json.dumps({"text": f"Rate {i}", "request_id": f"r{i}", **SHORT}))
            terminal = {}
            while len(terminal) < 4:
                frame = await asyncio.wait_for(ws.recv(), 60)
                if isinstance(frame, str) and reply_json(frame)["status"] in ("success", "error"):
                    terminal[reply_json(frame)["request_id"]] = reply_json(frame)
        async with websockets.connect(url(server)) as other:
            await other.send(json.dumps({"text": "Other connection", **SHORT}))
            assert (await collect(other))[0]["status"] == "success"
    assert [terminal[f"r{i}"]["status"] for i in range(3)] == ["success"] * 3
    assert terminal["r3"]["code"] == "rate_limited"


def test_token_bucket_refills_over_time():
    now = [0.0]
    bucket = RateLimiter(60, clock=lambda: now[0])
    assert all(bucket.allow() for _ in range(60)) and not bucket.allow()
    now[0] += 1.0
    assert bucket.allow() and not bucket.allow()


async def test_queued_requests_per_connection_are_bounded(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir, delay=1.0), wait_loaded=False,
                              max_queued_per_connection=2) as server:
        async with websockets.connect(url(server)) as ws:
            await recv_json(ws)
            for rid in ("a", "b", "c"):
                await ws.send(json.dumps({"text": "Queue me", "request_id": rid, **SHORT}))
            refused = await recv_json(ws)  # at once, before a and b (no loading notices: the one on connect)
            assert refused == {"status": "error", "code": "too_many_queued", "message": refused["message"],
                               "request_id": "c"}
            assert [(await collect(ws, rid))[0]["status"] for rid in ("a", "b")] == ["success", "success"]


async def test_voice_upload_limits_are_configurable(tiny_model_dir):
    from audio_fixtures import audio_bytes, speechlike

    async with running_server(csm_slot(tiny_model_dir), max_voice_bytes=50_000, max_voice_seconds=2) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"type": "voice", "speaker": 1, "text": "Too big."}))
            await ws.send(audio_bytes(speechlike(1.5)))  # 72 kB
            big = await recv_json(ws)
            await ws.send(json.dumps({"type": "voice", "speaker": 1, "text": "Too long."}))
            await ws.send(audio_bytes(speechlike(2.5, 8000), 8000))  # 40 kB, 2.5 s
            long = await recv_json(ws)
    assert big["code"] == long["code"] == "invalid_voice"
    assert "limit is" in big["message"] and "lasts 2.50 s" in long["message"]


def test_forwarded_for_is_believed_only_from_trusted_proxies_and_only_its_rightmost_untrusted_entry():
    from starlette.datastructures import Headers

    from tts_server.core.security import ProxyTrust

    trust = ProxyTrust(("127.0.0.1", "10.0.0.0/8"))
    forwarded = lambda value: Headers(raw=[(b"x-forwarded-for", value.encode())])  # noqa: E731
    assert trust.client("127.0.0.1", forwarded("203.0.113.7")) == "203.0.113.7"
    assert trust.client("127.0.0.1", forwarded("6.6.6.6, 203.0.113.7, 10.1.2.3")) == "203.0.113.7"  # chained proxies
    assert trust.client("198.51.100.2", forwarded("203.0.113.7")) == "198.51.100.2"  # not a proxy: header ignored
    assert trust.client("127.0.0.1", Headers(raw=[])) == "127.0.0.1"
    assert ProxyTrust().client("127.0.0.1", forwarded("203.0.113.7")) == "127.0.0.1"  # none trusted by default
