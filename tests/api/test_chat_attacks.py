"""The chat model attacked as a broken or hostile chat server would: whatever its stream holds, every answer ends with
one terminal reply naming its request and the connection serves on; an address with a query still reaches its API."""

from __future__ import annotations

import asyncio
import json

import websockets

from audio_fixtures import audio_bytes, speechlike
from conftest import TERMINAL, csm_slot, read_until, recv_json, running_server, url
from fake_chat import FakeChat

SENTENCE = json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                       "choices": [{"index": 0, "delta": {"content": "Hello there."}, "finish_reason": None}]})
MALFORMED = ["{not json", '{"choices": "x"}', '{"choices": [null]}', '{"choices": [{"delta": "hi"}]}', "42", "null",
             '{"choices": [{"index": 0, "delta": {"content": 5}}]}']


async def test_a_chat_stream_of_malformed_chunks_ends_each_answer_model_unavailable_and_the_connection_serves_on(
        tiny_model_dir):
    """Chunks that are not JSON, or JSON of another shape (a number for the text, no choices), alone or after a
    sentence that is already being spoken."""
    from tts_server.engines.chat import ChatModel

    with FakeChat("") as chat:
        async with running_server(csm_slot(tiny_model_dir), chat=ChatModel(chat.url, "test-model", timeout=10),
                                  rate_limit=10**6) as server:
            async with websockets.connect(url(server)) as ws, asyncio.timeout(120):
                await ws.send(json.dumps({"type": "turn", "speaker": 1, "text": "Hello."}))
                await ws.send(audio_bytes(speechlike(1.0)))
                assert (await recv_json(ws))["status"] == "turn_saved"
                ended = {}
                for i, payloads in enumerate([[bad] for bad in MALFORMED] + [[SENTENCE, bad] for bad in MALFORMED]):
                    chat.raw = payloads
                    await ws.send(json.dumps({"type": "respond", "request_id": f"r{i}", "max_audio_length_ms": 160}))
                    final, _, _ = await read_until(ws, lambda r: r.get("status") in TERMINAL and
                                                   r.get("request_id") == f"r{i}")
                    ended[i] = final.get("code")
                await ws.send(json.dumps({"text": "Hi.", "max_audio_length_ms": 160, "request_id": "next"}))
                served, _, _ = await read_until(ws, lambda r: r.get("status") in TERMINAL and
                                                r.get("request_id") == "next")
    assert set(ended.values()) == {"model_unavailable"}, ended
    assert served["status"] == "success"


async def test_a_chat_or_remote_address_with_a_query_reaches_its_api_path_with_the_query(tiny_model_dir):
    """``--chat-url http://host/v1?key=...`` (and ``--remote-url``): the request goes to ``/v1/chat/completions``
    (``/v1/audio/speech``) with the query, not to ``/v1/?key=...chat/completions``."""
    from tts_server.core.jobs import EngineSlot
    from tts_server.engines.chat import ChatModel
    from tts_server.engines.remote import RemoteEngine

    with FakeChat("Fine.") as chat:
        address = chat.url + "?key=q-secret&api-version=2"
        async with running_server(csm_slot(tiny_model_dir), EngineSlot(RemoteEngine(address)),
                                  chat=ChatModel(address, "test-model", timeout=10)) as server:
            async with websockets.connect(url(server)) as ws, asyncio.timeout(60):
                await ws.send(json.dumps({"type": "turn", "speaker": 1, "text": "Hello."}))
                await ws.send(audio_bytes(speechlike(1.0)))
                assert (await recv_json(ws))["status"] == "turn_saved"
                await ws.send(json.dumps({"type": "respond", "request_id": "a", "max_audio_length_ms": 160}))
                answered, _, _ = await read_until(ws, lambda r: r.get("status") in TERMINAL)
                await ws.send(json.dumps({"text": "Hi.", "engine": "remote", "request_id": "s"}))
                await read_until(ws, lambda r: r.get("status") in TERMINAL)  # the chat server speaks no speech API
    assert answered["status"] == "success"
    query = "?key=q-secret&api-version=2"
    assert chat.paths == [f"/v1/chat/completions{query}", f"/v1/audio/speech{query}"]
