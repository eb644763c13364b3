"""Engines behind one interface: Piper speaking for real, fallback rules, HTTP endpoints."""

from __future__ import annotations

import asyncio
import io
import json

import numpy as np
import pytest
import soundfile as sf
import websockets
from prometheus_client.parser import text_string_to_metric_families

from conftest import ahttp_get, collect, csm_slot, piper_slot, recv_json, running_server, url
from tts_server.engines.base import EngineError
from tts_server.engines.csm import CsmEngine
from tts_server.engines.piper import PiperEngine
from tts_server.core.jobs import EngineSlot

SENTENCE = "The quick brown fox jumps over the lazy dog."




async def speak(server, payload: dict) -> tuple[dict, bytes, list]:
    async with websockets.connect(url(server)) as ws:
        await ws.send(json.dumps(payload))
        return await collect(ws)


async def test_piper_speaks_real_audio_resampled_to_24khz():
    async with running_server(piper_slot()) as server:
        reply, audio, _ = await speak(server, {"text": SENTENCE})
    assert reply["status"] == "success" and reply["engine"] == "piper" and reply["voice"] == "en_US-joe-medium"
    samples, rate = sf.read(io.BytesIO(audio), dtype="float32")
    assert rate == 24000 and samples.ndim == 1
    duration = len(samples) / rate
    assert 1.5 < duration < 6.0, duration  # ~44 characters of English
    rms = float(np.sqrt(np.mean(samples**2)))
    assert rms > 0.01, rms
    assert np.mean(np.abs(samples) < 1e-3) < 0.5  # mostly voiced, not silence


async def test_piper_follows_the_configured_output_rate():
    async with running_server(piper_slot(), sample_rate=16000) as server:
        reply, audio, _ = await speak(server, {"text": "Sixteen kilohertz.", "format": "pcm"})
    assert reply["sample_rate"] == 16000
    assert len(audio) // 2 == pytest.approx(reply["duration_s"] * 16000, abs=1)


async def test_piper_streams_sentence_by_sentence():
    async with running_server(piper_slot()) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"text": "First sentence here. Second one follows. And a third.",
                                      "stream": True}))
            start = await recv_json(ws)
            reply, audio, _ = await collect(ws)
    assert start["status"] == "start" and start["engine"] == "piper" and start["format"] == "pcm"
    assert reply["chunks"] >= 3 and reply["length_bytes"] == len(audio)


async def test_auto_falls_back_to_piper_when_csm_cannot_load(broken_model_dir):
    async with running_server(csm_slot(broken_model_dir), piper_slot()) as server:
        reply, audio, _ = await speak(server, {"text": SENTENCE})
        status, body = await ahttp_get(server.port, "/v1/info")
        ready = await ahttp_get(server.port, "/ready")
    assert reply["status"] == "success" and reply["engine"] == "piper" and audio
    info = json.loads(body)
    assert info["serving"]["engine"] == "piper"
    assert info["serving"]["reason"].startswith("CSM-1B unavailable: cannot load CSM from")
    assert "serving with Piper en_US-joe-medium" in info["serving"]["reason"]
    assert info["engines"]["csm"]["state"] == "failed" and info["engines"]["piper"]["state"] == "ready"
    assert ready[0] == 200 and json.loads(ready[1])["engine"] == "piper"


async def test_requests_during_csm_loading_wait_for_csm_not_piper(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir, delay=2.0), piper_slot(), wait_loaded=False) as server:
        await asyncio.wait_for(server.service.scheduler.slots["piper"].loaded.wait(), 60)
        assert server.service.scheduler.primary.state == "loading"
        assert (await ahttp_get(server.port, "/ready"))[0] == 503
        async with websockets.connect(url(server)) as ws:
            assert (await recv_json(ws))["status"] == "loading"
            await ws.send(json.dumps({"text": "Wait for me", "max_audio_length_ms": 240, "request_id": "w"}))
            await ws.send(json.dumps({"text": "Piper now, please.", "engine": "piper", "request_id": "p"}))
            first, _, _ = await collect(ws, "w")
            second, _, _ = await collect(ws, "p")
        assert (await ahttp_get(server.port, "/ready"))[0] == 200
    assert first["engine"] == "csm" and second["engine"] == "piper"


class FailingCsm(CsmEngine):
    """The real CSM engine made to fail: before its first chunk, or after it."""

    def __init__(self, folder, after_chunks: int) -> None:
        super().__init__(lambda: folder, device="cpu")
        self.after_chunks = after_chunks

    def synthesize(self, task):
        produced = 0
        for chunk in super().synthesize(task):
            if produced == self.after_chunks:
                break
            produced += 1
            yield chunk
        raise RuntimeError("simulated engine fault")


async def test_failure_before_audio_is_retried_on_the_fallback(tiny_model_dir):
    async with running_server(EngineSlot(FailingCsm(tiny_model_dir, 0)), piper_slot()) as server:
        reply, audio, _ = await speak(server, {"text": SENTENCE, "stream": True})
        named, _, _ = await speak(server, {"text": SENTENCE, "engine": "csm"})
    assert reply["status"] == "success" and reply["engine"] == "piper" and audio
    assert named["code"] == "generation_failed"  # a request that named its engine is not moved


async def test_engine_never_changes_after_audio_was_sent(tiny_model_dir):
    async with running_server(EngineSlot(FailingCsm(tiny_model_dir, 1)), piper_slot()) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"text": "One sentence here. And then another one.", "stream": True,
                                      "max_audio_length_ms": 800}))
            start = await recv_json(ws)
            reply, audio, _ = await collect(ws)
    assert start["engine"] == "csm" and len(audio) > 0
    assert reply["status"] == "error" and reply["code"] == "generation_failed"
    assert "simulated engine fault" in reply["message"]


async def test_explicit_engine_choice_and_unconfigured_engine(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir), piper_slot()) as server:
        piper, _, _ = await speak(server, {"text": "Piper here.", "engine": "piper"})
        csm, _, _ = await speak(server, {"text": "CSM here", "engine": "csm", "max_audio_length_ms": 160})
    assert piper["engine"] == "piper" and csm["engine"] == "csm"
    async with running_server(piper_slot()) as server:
        reply, _, _ = await speak(server, {"text": "CSM please", "engine": "csm"})
    assert reply["code"] == "model_unavailable" and "not configured" in reply["message"]


async def test_metrics_and_info_count_requests_per_engine(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir), piper_slot()) as server:
        await speak(server, {"text": "Piper speaks.", "engine": "piper"})
        await speak(server, {"text": "Piper again.", "engine": "piper"})
        await speak(server, {"text": "CSM speaks", "max_audio_length_ms": 160})
        async with websockets.connect(url(server)):
            status, text = await ahttp_get(server.port, "/metrics")
            info = json.loads((await ahttp_get(server.port, "/v1/info"))[1])
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("tts_requests_total", (("engine", "piper"), ("status", "success")))] == 2
    assert samples[("tts_requests_total", (("engine", "csm"), ("status", "success")))] == 1
    assert samples[("tts_characters_total", (("engine", "piper"),))] == len("Piper speaks.") + len("Piper again.")
    assert samples[("tts_audio_seconds_total", (("engine", "csm"),))] == pytest.approx(0.16)
    assert samples[("tts_generation_seconds_count", (("engine", "piper"),))] == 2
    assert samples[("tts_time_to_first_audio_seconds_count", (("engine", "csm"),))] == 1
    assert samples[("tts_active_connections", ())] == 2  # the WebSocket and the HTTP request reading /metrics
    assert samples[("tts_queue_depth", ())] == 0
    assert samples[("tts_engine_state", (("engine", "csm"), ("state", "ready")))] == 1
    assert samples[("tts_engine_state", (("engine", "csm"), ("state", "loading")))] == 0
    piper = info["engines"]["piper"]
    assert piper["stats"]["requests"] == 2 and piper["stats"]["failures"] == 0
    assert piper["stats"]["characters"] == 25 and piper["stats"]["mean_latency_s"] > 0
    assert piper["voice"] == "en_US-joe-medium" and info["engines"]["csm"]["device"] == "cpu"
    assert info["sample_rate"] == 24000 and "flac" in info["formats"]
    assert info["limits"] == {"max_text_chars": 4000, "max_queue": 32, "max_audio_length_ms": 90000,
                              "max_frame_bytes": 16 * 2**20}
    assert info["active_connections"] == 1


async def test_ready_is_503_with_the_reason_when_no_engine_can_serve(broken_model_dir):
    async with running_server(csm_slot(broken_model_dir)) as server:
        status, body = await ahttp_get(server.port, "/ready")
        health = await ahttp_get(server.port, "/health")
    assert status == 503 and json.loads(body)["state"] == "failed"
    assert "cannot load CSM" in json.loads(body)["reason"]
    assert health[0] == 200


def test_piper_engine_refuses_to_speak_before_loading():
    from tts_server.engines.base import SynthesisTask
    from tts_server.engines.request import SynthesisRequest

    with pytest.raises(EngineError):
        list(PiperEngine().synthesize(SynthesisTask(SynthesisRequest(text="x", request_id="r"))))
