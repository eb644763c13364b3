"""Sessions as a shared resource: creating them is rate-limited and capped per owner (key, or client address on a
keyless server), and storing a reply's turns never holds the engine's worker."""

from __future__ import annotations

import asyncio
import json
import threading

import websockets

from conftest import collect, csm_slot, recv_json, running_server, url
from tts_server.core.security import Gate
from tts_server.core.sessions import SessionStore

KEYS = ("key-one-0123456789", "key-two-0123456789")


async def bind(ws, session: str | None = None) -> dict:
    await ws.send(json.dumps({"type": "session", **({"session": session} if session else {})}))
    return await recv_json(ws)


def speak(request_id: str) -> str:
    return json.dumps({"text": "Hello there.", "seed": 3, "speaker": 0, "max_audio_length_ms": 400, "format": "pcm",
                       "request_id": request_id})


async def test_creating_sessions_counts_against_the_rate_limit(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir), rate_limit=3) as server:
        async with websockets.connect(url(server)) as ws:
            created = [await bind(ws) for _ in range(4)]
            resumed = await bind(ws, created[0]["session"])  # binding an existing one creates nothing
    assert [c["status"] for c in created[:3]] == ["session"] * 3
    assert created[3]["code"] == "rate_limited"
    assert resumed["status"] == "session"


async def test_one_address_or_key_cannot_take_every_session(tiny_model_dir):
    """Keyless: counted per client address (sessions stay shared by all); with keys: per key."""
    async with running_server(csm_slot(tiny_model_dir), max_sessions_per_owner=2,
                              trusted_proxies=("127.0.0.1",)) as server:
        async with websockets.connect(url(server), additional_headers={"X-Forwarded-For": "203.0.113.1"}) as ws:
            hog = [await bind(ws) for _ in range(3)]
        async with websockets.connect(url(server), additional_headers={"X-Forwarded-For": "203.0.113.2"}) as ws:
            other = await bind(ws)
            shared = await bind(ws, hog[0]["session"])
        server.service.admission.gate = Gate(KEYS)  # the same server with keys
        one, two = ({"Authorization": f"Bearer {key}"} for key in KEYS)
        async with websockets.connect(url(server), additional_headers=one) as ws:
            keyed = [await bind(ws) for _ in range(3)]
        async with websockets.connect(url(server), additional_headers=two) as ws:
            other_key = await bind(ws)
    assert [h["status"] for h in hog[:2]] == ["session", "session"]
    assert hog[2]["code"] == "too_many_sessions" and "2 sessions" in hog[2]["message"]
    assert other["status"] == shared["status"] == "session"
    assert [k.get("code") for k in keyed] == [None, None, "too_many_sessions"]
    assert other_key["status"] == "session"


async def test_storing_a_reply_does_not_hold_the_engine_worker(tiny_model_dir, monkeypatch):
    """One CSM worker; A's reply is made and its store call hangs: B's request is served meanwhile."""
    storing, release = threading.Event(), threading.Event()
    extend = SessionStore.extend

    def held(self, *args):
        storing.set()
        release.wait(60)
        return extend(self, *args)

    monkeypatch.setattr(SessionStore, "extend", held)
    async with running_server(csm_slot(tiny_model_dir)) as server:
        server.service.sessions.deadline = 60  # the store is slow, not down
        try:
            async with websockets.connect(url(server)) as a, websockets.connect(url(server)) as b:
                session = (await bind(a))["session"]
                await a.send(speak("a"))
                assert await asyncio.to_thread(storing.wait, 60)
                await b.send(speak("b"))
                b_final, _, _ = await collect(b, "b", timeout=30)
                release.set()
                a_final, _, _ = await collect(a, "a")
                stored = await bind(b, session)
        finally:
            release.set()
    assert b_final["status"] == "success" and a_final["status"] == "success"
    assert stored["turns"] == 1  # A's reply, stored before its success was sent
