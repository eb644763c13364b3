"""Sessions attacked as a busy or hostile client would (a real redis-server): creates racing from many connections or
replicas never pass the caps, a write Redis answers late is stored once, and a store outage during an answer or a
barge-in cut is an error naming its request while the connection serves on."""

from __future__ import annotations

import asyncio
import json
import signal
import threading

import numpy as np
import websockets

from audio_fixtures import audio_bytes, speechlike
from conftest import TERMINAL, csm_slot, read_until, recv_json, running_server, url
from fake_chat import FakeChat
from test_session_store_outage import Redis
from tts_server.core import session_redis
from tts_server.core.replies import Refusal
from tts_server.core.session_redis import RedisSessionStore
from tts_server.core.sessions import StoredTurn


def racing_creates(store: RedisSessionStore, owners: list[str]) -> list[str]:
    """One ``create`` per owner, all released at once from their own threads; the sessions made."""
    start, made = threading.Barrier(len(owners)), []

    def create(owner: str) -> None:
        start.wait()
        try:
            made.append(store.create("everyone", owner))
        except Refusal:
            pass

    threads = [threading.Thread(target=create, args=(owner,)) for owner in owners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return made


def test_creates_racing_in_redis_never_pass_the_per_owner_or_the_server_cap(tmp_path):
    """Eight creates at once, ten rounds: one owner (cap 3), then eight owners (server cap 3); as the store's four
    threads, or several replicas, send them."""
    redis = Redis(tmp_path)
    try:
        made = []
        for _ in range(10):
            store = RedisSessionStore(redis.url, max_per_owner=3, max_sessions=10**6)
            store._redis.flushdb()
            per_owner = len(racing_creates(store, ["one address"] * 8))
            store.close()
            store = RedisSessionStore(redis.url, max_sessions=3)
            store._redis.flushdb()
            made.append((per_owner, len(racing_creates(store, [f"address {i}" for i in range(8)]))))
            store.close()
    finally:
        redis.stop()
    assert made == [(3, 3)] * 10


def test_a_turn_redis_answers_late_is_stored_once(tmp_path, monkeypatch):
    """Redis stalls (SIGSTOP) just as a turn is pushed and resumes after the client's timeout: the write is not sent
    a second time (the stalled one is carried out when Redis resumes)."""
    redis = Redis(tmp_path)
    store = RedisSessionStore(redis.url)
    pack = session_redis._pack
    resume = threading.Timer(1.4, redis.proc.send_signal, (signal.SIGCONT,))  # after the 1 s timeout

    def stalled(*args):
        redis.proc.send_signal(signal.SIGSTOP)
        resume.start()
        return pack(*args)

    try:
        session = store.create("me")
        monkeypatch.setattr(session_redis, "_pack", stalled)
        try:
            store.append(session, "me", StoredTurn(1, "Said once.", 0.16, np.zeros((2, 32), np.int64)))
        except store.unreachable:
            pass  # told it may not be stored: a retry by the client is its choice
        monkeypatch.setattr(session_redis, "_pack", pack)
        resume.join()
        for _ in range(100):  # until Redis has carried out what it was sent while stopped
            if texts := [turn.text for turn in store.turns(session, "me")]:
                break
            threading.Event().wait(0.05)
    finally:
        store.close()
        redis.stop()
    assert texts == ["Said once."]


async def test_a_store_outage_during_an_answer_or_a_cut_names_its_request_and_the_connection_serves_on(
        tiny_model_dir, tmp_path):
    """Redis stalled: a ``respond`` is refused ``store_unavailable`` with its request_id; a barge-in ``cancel``
    whose cut cannot be stored is answered with an error for its request, and the next request is served."""
    from tts_server.engines.chat import ChatModel

    redis = Redis(tmp_path)
    try:
        with FakeChat("Fine.") as chat:
            async with running_server(csm_slot(tiny_model_dir), session_store=redis.url,
                                      chat=ChatModel(chat.url, "test-model", timeout=10)) as server:
                server.service.sessions.deadline = 0.5
                async with websockets.connect(url(server)) as ws, asyncio.timeout(90):
                    await ws.send(json.dumps({"type": "session"}))
                    assert (await recv_json(ws))["status"] == "session"
                    await ws.send(json.dumps({"type": "turn", "speaker": 1, "text": "Hello."}))
                    await ws.send(audio_bytes(speechlike(1.0)))
                    assert (await recv_json(ws))["status"] == "turn_saved"
                    redis.proc.send_signal(signal.SIGSTOP)
                    await ws.send(json.dumps({"type": "respond", "request_id": "answer"}))
                    answered = await recv_json(ws)
                    redis.proc.send_signal(signal.SIGCONT)
                    await ws.send(json.dumps({"text": "One two three four five six.", "speaker": 0, "format": "pcm",
                                              "max_audio_length_ms": 2000, "request_id": "long"}))
                    await read_until(ws, lambda r: r.get("status") in TERMINAL | {"start"})
                    redis.proc.send_signal(signal.SIGSTOP)
                    await ws.send(json.dumps({"type": "cancel", "request_id": "long", "played_ms": 100}))
                    cut, _, _ = await read_until(ws, lambda r: r.get("request_id") == "long" and (
                        r["status"] in ("truncated", "error")))
                    redis.proc.send_signal(signal.SIGCONT)
                    await ws.send(json.dumps({"text": "Hi.", "speaker": 0, "format": "pcm", "context": False,
                                              "max_audio_length_ms": 160, "request_id": "next"}))
                    served, _, _ = await read_until(ws, lambda r: r.get("status") in TERMINAL and
                                                    r.get("request_id") == "next")
    finally:
        redis.stop()
    assert answered["code"] == "store_unavailable" and answered["request_id"] == "answer"
    assert cut["status"] == "error" and cut["code"] == "store_unavailable"
    assert served["status"] == "success"
