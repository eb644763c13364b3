"""A stopped server releases what its engines and its chat client hold (models, batch threads, HTTP connection
pools), and only once no worker is still synthesizing with them."""

from __future__ import annotations

import asyncio
import json

import websockets

from conftest import csm_slot, piper_slot, running_server, url
from tts_server.engines.chat import ChatModel


def record_close(slot, closed: list) -> None:
    """Wrap the real engine's ``close``: note its name and which of its workers were still alive then."""
    engine, original = slot.engine, slot.engine.close

    def close() -> None:
        busy = [t.name for t in getattr(slot.executor, "_threads", ()) if t.is_alive()]
        original()
        closed.append((engine.name, busy))

    engine.close = close


async def test_stopping_the_server_closes_every_engine_and_the_chat_client(tiny_model_dir):
    csm, piper = csm_slot(tiny_model_dir, max_batch=2), piper_slot()
    closed: list = []
    record_close(csm, closed)
    record_close(piper, closed)
    chat = ChatModel("http://127.0.0.1:9/v1", "test-model", timeout=5)
    close_chat = chat.close

    async def chat_closed() -> None:
        await close_chat()
        closed.append(("chat", []))

    chat.close = chat_closed
    async with running_server(csm, piper, chat=chat) as server:
        ws = await websockets.connect(url(server))  # a long stream, still generating when the server stops
        await ws.send(json.dumps({"text": "A long story. " * 20, "stream": True, "format": "pcm", "engine": "csm"}))
        while not isinstance(await asyncio.wait_for(ws.recv(), 60), bytes):
            pass
        assert closed == []
    await ws.close()
    assert sorted(closed) == [("chat", []), ("csm", []), ("piper", [])]  # no worker was mid-synthesis
    assert csm.engine.model is None and csm.engine.batcher is None  # the model, and the batch thread's KV cache
    assert piper.engine.voices == []  # Piper's ONNX sessions
    assert chat._client.is_closed()
