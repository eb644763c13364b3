"""Small rules of texts and turns, on real servers: word times keep every whitespace-separated word whole, however
long; a text with nothing to speak is refused alike on the WebSocket, OpenAI's HTTP and Wyoming; ``turn_saved``
counts the turns actually kept."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlparse

import pytest
import pytest_asyncio
import websockets
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from audio_fixtures import audio_bytes, speechlike
from conftest import collect, csm_slot, free_port, piper_slot, read_until, recv_json, running_server, url

pytestmark = pytest.mark.asyncio(loop_scope="module")
LONG_WORD = "Pneumono" + "ultramicroscopicsilicovolcanoconiosis" * 7  # 267 characters, longer than a sentence piece
UNSPEAKABLE = ["—", " … ", "?!", "- -- —"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def piper(tmp_path_factory):
    """A Piper-only server (exact word times), with Wyoming."""
    async with running_server(piper_slot(), wyoming_uri=f"tcp://127.0.0.1:{free_port()}") as server:
        yield server


@pytest.mark.parametrize("stream", [True, False])
async def test_a_word_longer_than_a_sentence_piece_is_one_word_in_the_word_times(piper, stream):
    text = f"Say {LONG_WORD} twice. Then {LONG_WORD} again."
    async with websockets.connect(url(piper), max_size=None) as ws:  # the whole file is over 1 MiB
        await ws.send(json.dumps({"text": text, "stream": stream, "format": "pcm", "timestamps": True}))
        final, _, others = await read_until(ws, lambda r: r["status"] in ("success", "error"))
    words = [w for r, _ in others if r["status"] == "words" for w in r["words"]] if stream else final["words"]
    assert [w["word"] for w in words] == text.split()
    times = [t for w in words for t in (w["start_s"], w["end_s"])]
    assert times == sorted(times) and words[1]["end_s"] - words[1]["start_s"] > 1.0  # the whole word's span


@pytest.mark.parametrize("text", UNSPEAKABLE)
async def test_a_text_with_nothing_to_speak_is_invalid_request_on_the_websocket(piper, text):
    async with websockets.connect(url(piper)) as ws:
        await ws.send(json.dumps({"text": text, "request_id": "r"}))
        refused = await recv_json(ws)
        await ws.send(json.dumps({"text": "Still here.", "request_id": "s"}))
        final, _, _ = await collect(ws, "s")
    assert refused["code"] == "invalid_request" and "'text'" in refused["message"]
    assert refused["request_id"] == "r" and final["status"] == "success"


async def test_a_text_with_nothing_to_speak_is_a_400_over_openai_http(piper):
    from openai import BadRequestError, OpenAI

    def speak() -> None:
        with OpenAI(base_url=f"http://127.0.0.1:{piper.port}/v1", api_key="x", max_retries=0, timeout=60) as client:
            client.audio.speech.create(model="piper", voice="alloy", input="—").read()

    with pytest.raises(BadRequestError) as refused:
        await asyncio.to_thread(speak)
    assert refused.value.status_code == 400 and refused.value.body["type"] == "invalid_request_error"
    assert refused.value.body["param"] == "input" and "letter or digit" in refused.value.body["message"]


def wyoming_client(server) -> AsyncTcpClient:
    return AsyncTcpClient("127.0.0.1", urlparse(server.wyoming.uri).port)


async def test_a_wyoming_text_with_nothing_to_speak_is_refused_and_a_streamed_one_is_left_out(piper):
    async with wyoming_client(piper) as c:
        await c.write_event(Synthesize(text="—", voice=SynthesizeVoice(name="piper")).event())
        refused = Error.from_event(await asyncio.wait_for(c.read_event(), 60))
    events = []
    async with wyoming_client(piper) as c:
        await c.write_event(SynthesizeStart().event())
        await c.write_event(SynthesizeChunk(text="Hello there, how are you? —").event())
        await c.write_event(SynthesizeStop().event())
        while not events or events[-1].type != "synthesize-stopped":
            events.append(await asyncio.wait_for(c.read_event(), 60))
    assert refused.code == "invalid_request"
    assert [e.type for e in events if e.type != "audio-chunk"] == ["audio-start", "audio-stop", "synthesize-stopped"]


async def test_turn_saved_counts_the_turns_kept_within_max_context_turns(tiny_model_dir):
    audio = audio_bytes(speechlike(1.0, seed=3))
    async with running_server(csm_slot(tiny_model_dir), max_context_turns=2) as server:
        async with websockets.connect(url(server)) as ws:
            counts = []
            for i in range(4):
                await ws.send(json.dumps({"type": "turn", "speaker": 1, "text": f"Turn number {i}."}))
                await ws.send(audio)
                saved = await recv_json(ws)
                assert saved["status"] == "turn_saved", saved
                counts.append(saved["turns"])
    assert counts == [1, 2, 2, 2]


async def test_a_text_with_a_lone_surrogate_is_invalid_request_not_a_failed_generation(piper):
    # JSON may escape half a UTF-16 pair ("\ud800"); Python reads it as a string no engine can encode
    async with websockets.connect(url(piper)) as ws:
        await ws.send(json.dumps({"text": "Hello \ud800 there.", "request_id": "r"}))
        refused = await recv_json(ws)
        await ws.send(json.dumps({"text": "Still here.", "request_id": "s"}))
        final, _, _ = await collect(ws, "s")
    assert refused["code"] == "invalid_request" and "'text'" in refused["message"], refused
    assert final["status"] == "success"


async def test_a_wyoming_text_with_a_lone_surrogate_is_an_invalid_request_error_event(piper):
    from wyoming.event import async_read_event

    reader, writer = await asyncio.open_connection("127.0.0.1", urlparse(piper.wyoming.uri).port)
    try:  # the wyoming client cannot send it (it encodes UTF-8); a raw client escapes it in JSON
        writer.write(json.dumps({"type": "synthesize", "data": {"text": "Hello \ud800 there."}}).encode() + b"\n")
        await writer.drain()
        event = await asyncio.wait_for(async_read_event(reader), 30)
    finally:
        writer.close()
    assert Error.is_type(event.type) and Error.from_event(event).code == "invalid_request", event
