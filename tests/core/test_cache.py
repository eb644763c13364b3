"""The response cache on a real server with a tiny CSM: a seeded request without context is answered again byte
for byte without running an engine, streamed or whole, over WebSocket and the OpenAI SDK, within --cache-mb."""

from __future__ import annotations

import asyncio
import json

import pytest
import pytest_asyncio
import websockets
from openai import OpenAI

from conftest import ahttp_get, collect, csm_slot, running_server, url

pytestmark = pytest.mark.asyncio(loop_scope="module")
BUDGET = 100_000  # bytes: room for three 0.64 s WAV files of 24 kHz 16-bit audio
REQUEST = {"text": "Cache me if you can.", "seed": 7, "context": False, "max_audio_length_ms": 640}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir, max_batch=4), cache_bytes=BUDGET) as server:
        yield server


async def speak(server, **request) -> tuple[dict, bytes, list[dict]]:
    async with websockets.connect(url(server)) as ws:
        await ws.send(json.dumps(request))
        return await collect(ws)


def runs(server) -> int:
    stats = server.service.metrics.stats.get("csm")
    return stats.requests if stats else 0


async def test_a_repeated_seeded_request_is_answered_from_the_cache_with_identical_bytes(server):
    first, audio, _ = await speak(server, **REQUEST, format="wav")
    assert first["status"] == "success" and "cached" not in first and audio
    ran, hits = runs(server), server.service.scheduler.cache.hits
    again, audio_again, _ = await speak(server, **REQUEST, format="wav")
    assert again["cached"] is True and again["engine"] == "csm" and audio_again == audio
    assert again["duration_s"] == first["duration_s"] and again["request_id"] != first["request_id"]
    assert runs(server) == ran and server.service.scheduler.cache.hits == hits + 1  # no engine ran
    assert server.service.metrics.stats["csm"].cache_hits >= 1


async def test_a_cache_hit_streams_like_a_generation(server):
    first, audio, _ = await speak(server, **REQUEST, stream=True, speaker=1)
    ran = runs(server)
    again, audio_again, others = await speak(server, **REQUEST, stream=True, speaker=1)
    assert [o["status"] for o in others] == ["start"] and others[0]["engine"] == "csm"
    assert again["cached"] and again["chunks"] >= 1 and audio_again == audio and runs(server) == ran


@pytest.mark.parametrize("change", [{"seed": None}, {"context": True}])
async def test_requests_whose_audio_is_not_fixed_by_their_inputs_are_never_cached(server, change):
    request = {**REQUEST, "text": f"Not cached {sorted(change)}.", **change}
    request = {k: v for k, v in request.items() if v is not None}
    ran = runs(server)
    for _ in range(2):
        reply, _, _ = await speak(server, **request)
        assert reply["status"] == "success" and "cached" not in reply
    assert runs(server) == ran + 2


@pytest.mark.parametrize("stream", [True, False])
async def test_a_cached_request_asked_again_with_timestamps_and_progress_gets_those_replies(server, stream):
    """The cache holds audio, not the replies beside it: a request that asks for word times or progress is made
    afresh (this server has no aligner, so its word times come as the reason there are none)."""
    request = {**REQUEST, "text": f"Asked again with more, {stream}.", "stream": stream, "format": "pcm"}
    first, audio, _ = await speak(server, **request)
    again, audio_again, others = await speak(server, **request, timestamps=True, progress=True)
    assert first["status"] == again["status"] == "success" and audio_again == audio  # seeded: the same audio
    assert "cached" not in again and "--stt-model" in again["words_unavailable"]
    assert [o["status"] for o in others if o["status"] == "progress"] == ["progress"]


async def test_the_openai_sdk_gets_the_same_bytes_from_the_cache(server):
    def speak_http() -> bytes:
        with OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0, timeout=60) as client:
            return client.audio.speech.create(model="tts-1", voice="nova", input=REQUEST["text"],
                                              response_format="wav",
                                              extra_body={"seed": 11, "max_audio_length_ms": 640}).content

    first = await asyncio.to_thread(speak_http)
    ran = runs(server)
    assert await asyncio.to_thread(speak_http) == first and runs(server) == ran


async def test_the_cache_stays_within_its_budget_and_says_so_in_info_and_metrics(server):
    for seed in range(20, 26):
        reply, _, _ = await speak(server, **{**REQUEST, "seed": seed}, format="wav")
        assert reply["status"] == "success"
        assert server.service.scheduler.cache.bytes <= BUDGET
    cache = json.loads((await ahttp_get(server.port, "/v1/info"))[1])["cache"]
    assert cache["max_bytes"] == BUDGET and cache["bytes"] <= BUDGET and cache["evictions"] >= 3
    assert 0 < cache["entries"] <= 3 and cache["hits"] >= 3 and cache["misses"] >= 6
    ran = runs(server)
    reply, _, _ = await speak(server, **{**REQUEST, "seed": 20}, format="wav")  # the oldest: evicted, made again
    assert "cached" not in reply and runs(server) == ran + 1
    metrics = (await ahttp_get(server.port, "/metrics"))[1]
    for line in ('tts_cache_hits_total{engine="csm"}', 'tts_cache_misses_total{engine="csm"}', "tts_cache_bytes ",
                 "tts_cache_entries "):
        assert line in metrics
    stats = json.loads((await ahttp_get(server.port, "/v1/info"))[1])["engines"]["csm"]["stats"]
    assert 0 < stats["cache_hit_rate"] < 1
