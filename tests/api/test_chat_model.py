"""The chat model as a shared resource (issue 27, items 9-12): an answer is bounded by the chat timeout whatever the
chat server sends, a cancel closes its stream at once, hands-free answers count against the rate limit, the prompt
is the session's whole stored transcript, and the chat server's address and errors reach no one raw."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import websockets

from audio_fixtures import audio_bytes, speechlike
from conftest import ahttp_get, csm_slot, read_until, running_server, url
from fake_chat import FakeChat
from test_sessions import bind, turn
from test_voice_chat import send_pcm, server_options, until, utterance


def chat_only(chat: FakeChat, chat_timeout: float = 30) -> dict:
    """A server's options for a chat model and no speech recognition (the turns come with their text)."""
    from tts_server.engines.chat import ChatModel

    return {"chat": ChatModel(chat.url, "test-model", chat.key, "Answer briefly.", timeout=chat_timeout)}


async def test_a_chat_model_that_sends_one_sentence_then_only_chunks_without_text_is_stopped_at_the_chat_timeout(
        tiny_model_dir):
    """Empty deltas, reasoning tokens, chunks without choices and SSE comments keep arriving after "Well.": none of
    them is a sentence, so the answer ends ``model_unavailable`` at the chat timeout and the stream is closed."""
    with FakeChat("Well.", idle=0.05) as chat:
        async with running_server(csm_slot(tiny_model_dir), **chat_only(chat, chat_timeout=2)) \
                as server:
            async with websockets.connect(url(server)) as ws:
                await turn(ws, audio_bytes(speechlike(1.0)), "Say something.")
                await ws.send(json.dumps({"type": "respond", "request_id": "k", "max_audio_length_ms": 160}))
                ended, seen, _ = await until(ws, "error", timeout=60)
                hung_up = await asyncio.to_thread(chat.hung_up.wait, 20)
                alive = await turn(ws, audio_bytes(speechlike(1.0)), "Still there?")
    assert ended["code"] == "model_unavailable" and ended["request_id"] == "k"
    assert "no complete sentence for 2 s" in ended["message"]
    assert [r["delta"] for r in seen if r["status"] == "reply_text"] == ["Well."]
    assert hung_up and alive["status"] == "turn_saved"


async def test_a_cancel_closes_the_chat_stream_at_once_while_the_connection_stays_open(tiny_model_dir):
    """The chat server sends keep-alives forever (the chat timeout is far away): the cancel itself hangs up."""
    with FakeChat("Well.", idle=0.05) as chat:
        async with running_server(csm_slot(tiny_model_dir), **chat_only(chat, chat_timeout=120)) \
                as server:
            async with websockets.connect(url(server)) as ws:
                await turn(ws, audio_bytes(speechlike(1.0)), "Say something.")
                await ws.send(json.dumps({"type": "respond", "request_id": "c", "max_audio_length_ms": 160}))
                await until(ws, "reply_text")
                await ws.send(json.dumps({"type": "cancel", "request_id": "c"}))
                cancelled, _, _ = await until(ws, "cancelled")
                hung_up = await asyncio.to_thread(chat.hung_up.wait, 20)  # the WebSocket is still open
                alive = await turn(ws, audio_bytes(speechlike(1.0)), "Still there?")
    assert cancelled["request_id"] == "c" and hung_up and alive["status"] == "turn_saved"


async def test_answers_to_hands_free_turns_count_against_the_rate_limit_and_the_turns_are_kept(tiny_model_dir,
                                                                                               whisper_dir,
                                                                                               monkeypatch):
    """--rate-limit 2, its bucket never refilled (a stopped clock): turn_start takes one request, the first
    utterance's answer the other; the second utterance is saved, its answer refused ``rate_limited``."""
    from functools import partial

    from tts_server.api import websocket as ws_api
    from tts_server.core.security import RateLimiter

    monkeypatch.setattr(ws_api, "RateLimiter", partial(RateLimiter, clock=lambda: 0.0))
    with FakeChat("Fine.") as chat:
        async with running_server(csm_slot(tiny_model_dir), rate_limit=2, **server_options(whisper_dir, chat)) \
                as server:
            async with websockets.connect(url(server)) as ws:
                await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": 16000, "vad": True,
                                          "respond": {"speaker": 0, "max_audio_length_ms": 160}}))
                await send_pcm(ws, np.concatenate([utterance(), utterance()]), 16000)
                seen: list[dict] = []

                def both_ended(reply: dict) -> bool:  # the first answer and the second turn's (frames interleave)
                    seen.append(reply)
                    return sum(r["status"] in ("success", "error") for r in seen) == 2

                await read_until(ws, both_ended, 120)
    saved = [r for r in seen if r["status"] == "turn_saved"]
    assert len(saved) == 2 and all(r["text"] and r["speaker"] == 1 for r in saved)
    ended = [r.get("code", r["status"]) for r in seen if r["status"] in ("success", "error")]
    assert sorted(ended) == ["rate_limited", "success"] and len(chat.requests) == 1
    refused = seen.index(next(r for r in seen if r.get("code") == "rate_limited"))
    assert seen.index(saved[1]) < refused  # the turn was kept, then its answer refused


async def test_the_chat_prompt_is_the_sessions_whole_transcript_from_both_connections(tiny_model_dir):
    """--max-context-turns 1 keeps CSM's prompt to one turn; the chat model still reads every stored turn, whole (an
    answer's sentences joined), including those another connection on the session added."""
    with FakeChat("Hello Ada. Nice to meet you.") as chat:
        async with running_server(csm_slot(tiny_model_dir), max_context_turns=1,
                                  **chat_only(chat)) as server:
            async with websockets.connect(url(server)) as a, websockets.connect(url(server)) as b:
                session = (await bind(a))["session"]
                await bind(b, session)
                await turn(a, audio_bytes(speechlike(1.0)), "My name is Ada.")
                await a.send(json.dumps({"type": "respond", "max_audio_length_ms": 160}))
                await until(a, "success")
                await turn(b, audio_bytes(speechlike(1.0)), "And I am Bob.", speaker=2)
                await a.send(json.dumps({"type": "respond", "max_audio_length_ms": 160}))
                await until(a, "success")
    assert chat.requests[1]["messages"][1:] == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Hello Ada. Nice to meet you."},
        {"role": "user", "content": "And I am Bob."}]


async def test_the_chat_and_remote_addresses_are_shown_without_credentials_and_their_errors_summarised(
        tiny_model_dir):
    """Both answer HTTP 500 with a body holding a secret: no reply, and not /v1/info, shows the password, the
    query's secret or the body; the status is said."""
    from tts_server.core.jobs import EngineSlot
    from tts_server.engines.chat import ChatModel
    from tts_server.engines.remote import RemoteEngine

    body = json.dumps({"error": {"message": "db password is hunter2-body", "type": "server_error"}})
    with FakeChat("", error=(500, body)) as failing:
        secret_url = failing.url.replace("http://", "http://ada:hunter2-pw@") + "?key=hunter2-query"
        async with running_server(csm_slot(tiny_model_dir), EngineSlot(RemoteEngine(secret_url)),
                                  chat=ChatModel(secret_url, "test-model", timeout=5)) as server:
            async with websockets.connect(url(server)) as ws:
                await turn(ws, audio_bytes(speechlike(1.0)), "Hello?")
                await ws.send(json.dumps({"type": "respond", "request_id": "r"}))
                answered, _, _ = await until(ws, "error")
                await ws.send(json.dumps({"text": "Hello.", "engine": "remote", "request_id": "s"}))
                spoken, _, _ = await until(ws, "error")
            _, info = await ahttp_get(server.port, "/v1/info")
    assert len(failing.requests) == 2  # both reached the failing server
    for reply in (answered, spoken):
        assert "hunter2" not in reply["message"] and "500" in reply["message"], reply
        assert f"127.0.0.1:{failing.server.server_address[1]}/v1" in reply["message"]
    assert answered["code"] == "model_unavailable" and "Internal Server Error" in answered["message"]
    assert "hunter2" not in info and "ada:" not in info
    assert json.loads(info)["conversation"]["chat"]["url"] == f"http://127.0.0.1:{failing.server.server_address[1]}" \
                                                                  "/v1?key=***"
