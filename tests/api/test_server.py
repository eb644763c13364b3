"""The real server on a loopback port, driven by a real websockets client, with a tiny real CSM."""

from __future__ import annotations

import asyncio
import io
import json
import threading

import numpy as np
import pytest
import soundfile as sf
import websockets
from websockets.exceptions import ConnectionClosedError

from conftest import ahttp_get, collect, csm_slot, read_wav, recv_json, running_server, url
from tts_server.engines.csm import CsmEngine
from tts_server.core.jobs import EngineSlot

SHORT = {"max_audio_length_ms": 400}  # 5 frames: keeps the suite fast


async def test_seed004_exchange_returns_metadata_then_one_wav_frame(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"text": "Hello", "speaker": 0}))
            meta = await recv_json(ws)
            audio = await asyncio.wait_for(ws.recv(), 60)
    assert meta["status"] == "success" and meta["message"] == "Audio generated successfully"
    assert meta["format"] == "wav" and meta["sample_rate"] == 24000 and meta["engine"] == "csm"
    assert isinstance(audio, bytes) and meta["length_bytes"] == len(audio)
    samples, rate = read_wav(audio)
    assert rate == 24000 and samples.ndim == 1
    assert meta["duration_s"] == pytest.approx(len(samples) / 24000, abs=1e-3)
    assert len(samples) % 1920 == 0 and np.abs(samples).max() > 0
    assert isinstance(meta["request_id"], str) and meta["generation_s"] > 0


@pytest.mark.parametrize("fmt", ["wav", "pcm", "flac", "ogg"])
async def test_each_format_decodes_to_the_same_length(tiny_model_dir, fmt):
    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"text": "Format check", "format": fmt, "seed": 1, **SHORT}))
            meta, audio, _ = await collect(ws)
    assert meta["status"] == "success" and meta["format"] == fmt and meta["length_bytes"] == len(audio)
    frames = 5 * 1920
    if fmt == "pcm":
        assert len(audio) == 2 * frames
    else:
        samples, rate = sf.read(io.BytesIO(audio))
        assert rate == 24000 and len(samples) == frames


async def test_same_seed_gives_identical_audio_and_other_seeds_differ(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            results = []
            for seed in (11, 11, 12):
                await ws.send(json.dumps({"text": "Seeded speech", "seed": seed, "context": False, **SHORT}))
                results.append((await collect(ws))[1])
    assert results[0] == results[1] and results[0] != results[2]


async def test_requests_sent_while_loading_are_queued_then_answered(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir, delay=1.5), wait_loaded=False) as server:
        clients = [await websockets.connect(url(server)) for _ in range(3)]
        try:
            for ws in clients:
                hello = await recv_json(ws)
                assert hello["status"] == "loading"
                assert hello["message"] == "TTS model is still loading, request will be processed when ready"
            for i, ws in enumerate(clients):
                await ws.send(json.dumps({"text": f"Queued number {i}", "request_id": f"q{i}", **SHORT}))
            for i, ws in enumerate(clients):
                reply, audio, others = await collect(ws)
                assert others == []  # the notice on connect covers the requests that follow it
                assert reply["status"] == "success" and reply["request_id"] == f"q{i}" and audio
        finally:
            for ws in clients:
                await ws.close()


async def test_replies_on_one_connection_come_in_request_order(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            ids = ["first", "second", "third", "fourth"]
            for i, rid in enumerate(ids):
                await ws.send(json.dumps({"text": "Word " * (4 - i), "request_id": rid, **SHORT}))
            order = [(await collect(ws))[0]["request_id"] for _ in ids]
    assert order == ids


async def test_full_queue_answers_busy_at_once_and_accepted_requests_still_finish(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir, delay=1.0), max_queue=2, wait_loaded=False) as server:
        async with websockets.connect(url(server)) as ws:
            await recv_json(ws)  # loading notice on connect
            for rid in ("a", "b", "c"):
                await ws.send(json.dumps({"text": "Fill the queue", "request_id": rid, **SHORT}))
            refused = await recv_json(ws)  # no second loading notice: the one on connect covers a and b
            assert refused["code"] == "busy" and refused["request_id"] == "c"
            assert [(await collect(ws))[0]["request_id"] for _ in range(2)] == ["a", "b"]


async def test_failed_model_load_answers_model_unavailable_to_queued_and_later_requests(broken_model_dir):
    async with running_server(csm_slot(broken_model_dir, delay=0.5), wait_loaded=False) as server:
        async with websockets.connect(url(server)) as ws:
            await recv_json(ws)
            await ws.send(json.dumps({"text": "While loading", "request_id": "early"}))
            reply, _, others = await collect(ws)
            assert others == []
            assert reply["code"] == "model_unavailable" and reply["request_id"] == "early"
            assert str(broken_model_dir) in reply["message"]
            await ws.send(json.dumps({"text": "After failure", "request_id": "late"}))
            reply = await recv_json(ws)
            assert reply["code"] == "model_unavailable" and reply["request_id"] == "late"


async def test_immediate_end_of_audio_is_generation_failed_and_the_server_lives_on(silent_model_dir):
    async with running_server(csm_slot(silent_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"text": "Say nothing", "top_k": 1, "request_id": "mute"}))
            reply, audio, _ = await collect(ws)
            assert reply["code"] == "generation_failed" and reply["request_id"] == "mute" and not audio
            await ws.send(json.dumps({"text": "Now sample", "temperature": 1.5, "seed": 2, **SHORT}))
            reply, audio, _ = await collect(ws)
            assert reply["status"] == "success" and audio


class GarbageOnceEngine(CsmEngine):
    """The real CSM engine, except that its first request yields a non-audio object."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fired = threading.Event()

    def synthesize(self, task):
        if not self.fired.is_set():
            self.fired.set()
            yield "garbage"
            return
        yield from super().synthesize(task)


async def test_garbage_from_an_engine_is_internal_error_for_that_request_only(tiny_model_dir):
    slot = EngineSlot(GarbageOnceEngine(lambda: tiny_model_dir, device="cpu"))
    async with running_server(slot) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"text": "Break please", "request_id": "bad"}))
            reply, _, _ = await collect(ws)
            assert reply == {"status": "error", "code": "internal_error", "message": reply["message"],
                             "request_id": "bad"}
            await ws.send(json.dumps({"text": "Work again", **SHORT}))
            assert (await collect(ws))[0]["status"] == "success"


async def test_bad_input_gets_json_errors_and_the_connection_stays_usable(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir), max_text_chars=20) as server:
        async with websockets.connect(url(server)) as ws:
            cases = [
                ("{oops", "invalid_json"),
                (b"\x00binary", "invalid_request"),
                (json.dumps({"speaker": 0}), "invalid_request"),
                (json.dumps({"text": "x" * 21, "request_id": "long"}), "text_too_long"),
                (json.dumps({"text": "hi", "emotion": "happy"}), "unknown_emotion"),
                (json.dumps({"text": "hi", "engine": "kokoro"}), "invalid_request"),
                (json.dumps({"text": "hi", "engine": "piper"}), "model_unavailable"),
                (json.dumps({"type": "cancel", "request_id": "nope"}), "unknown_request"),
            ]
            for raw, code in cases:
                await ws.send(raw)
                reply = await recv_json(ws)
                assert reply["status"] == "error" and reply["code"] == code, (raw, reply)
                assert reply["message"]
            await ws.send(json.dumps({"text": "Still here", **SHORT}))
            assert (await collect(ws))[0]["status"] == "success"


async def test_oversized_frame_closes_only_that_connection_with_1009(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server), max_size=None) as victim:
            await victim.send(b"x" * (16 * 2**20 + 10))
            with pytest.raises(ConnectionClosedError) as info:
                await asyncio.wait_for(victim.recv(), 10)
            assert info.value.rcvd.code == 1009
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"text": "Server survived", **SHORT}))
            assert (await collect(ws))[0]["status"] == "success"


async def test_cancel_a_queued_request_answers_cancelled(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir, delay=1.0), wait_loaded=False) as server:
        async with websockets.connect(url(server)) as ws:
            await recv_json(ws)  # loading notice (the only one: it covers the request below)
            await ws.send(json.dumps({"text": "Never mind", "request_id": "gone"}))
            await ws.send(json.dumps({"type": "cancel", "request_id": "gone"}))
            reply = await recv_json(ws)
            assert reply == {"status": "cancelled", "request_id": "gone"}
            await ws.send(json.dumps({"type": "cancel", "request_id": "gone"}))
            assert (await recv_json(ws))["code"] == "unknown_request"


async def test_streamed_wav_frames_concatenate_to_a_playable_file(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"text": "Stream it", "stream": True, "format": "wav", **SHORT}))
            start = await recv_json(ws)
            reply, audio, _ = await collect(ws)
    assert start["status"] == "start" and start["sample_width"] == 2 and start["channels"] == 1
    assert reply["status"] == "success" and reply["length_bytes"] == len(audio) and reply["chunks"] >= 1
    assert audio[4:8] == b"\xff\xff\xff\xff"
    samples, rate = sf.read(io.BytesIO(audio), dtype="int16")
    assert rate == 24000 and len(samples) == 5 * 1920




async def test_plain_http_gets_health_404_and_upgrade_required(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir)) as server:
        health = await ahttp_get(server.port, "/health")
        missing = await ahttp_get(server.port, "/nope")
        plain = await ahttp_get(server.port, "/ws")
        page = await ahttp_get(server.port, "/")
        script = await ahttp_get(server.port, "/static/app.js")
        escape = await ahttp_get(server.port, "/static/../server.py")
    assert health[0] == 200 and json.loads(health[1])["status"] == "ok"
    assert page[0] == 200 and "<title>CSM voice chat</title>" in page[1]
    assert script[0] == 200 and "__tts" in script[1] and escape[0] == 404
    assert missing[0] == 404
    assert plain[0] == 426 and "WebSocket" in plain[1]
