"""OpenAI's speech API on the server's port, driven by the official ``openai`` SDK against the real server."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import av
import numpy as np
import pytest
import pytest_asyncio
import soundfile as sf
import websockets
from openai import APIStatusError, OpenAI

from audio_fixtures import speechlike, write_audio
from conftest import ahttp_get, collect, csm_slot, piper_slot, running_server, url
from tts_server.core.context import ReferenceLibrary
from tts_server.core.security import Gate

pytestmark = pytest.mark.asyncio(loop_scope="module")  # one event loop for the module's shared server
TEXT = "Hello there, friend. How are you today?"
SHORT = {"max_audio_length_ms": 800, "seed": 5}


def client_for(server, key: str = "unused") -> OpenAI:
    """An SDK client for ``server``; use it in a ``with`` block, which closes its pooled connections (left to the
    garbage collector, their sockets would be reported unclosed in whichever later test it runs in)."""
    return OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=key, max_retries=0, timeout=60)


def decode(data: bytes, fmt: str, rate: int = 24000) -> tuple[np.ndarray, int]:
    """Samples and rate of a response body in ``fmt`` (PyAV for AAC, which libsndfile cannot read)."""
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2") / 32768.0, rate
    if fmt == "aac":
        with av.open(io.BytesIO(data)) as container:
            frames = list(container.decode(audio=0))
        return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]), frames[0].sample_rate
    samples, rate = sf.read(io.BytesIO(data), dtype="float32")
    return samples, rate


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def csm_and_piper(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir, max_batch=4), piper_slot()) as server:
        yield server


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
@pytest.mark.parametrize("model", ["tts-1", "piper"])
async def test_every_response_format_decodes_at_24khz_with_a_plausible_duration(csm_and_piper, fmt, model):
    def speak():
        with client_for(csm_and_piper) as client:
            return client.audio.speech.create(model=model, voice="alloy", input=TEXT, response_format=fmt,
                                              extra_body=SHORT if model == "tts-1" else None).content

    samples, rate = decode(await asyncio.to_thread(speak), fmt)
    seconds = len(samples) / rate
    assert rate == 24000
    if model == "piper":  # Piper speaks the sentence at its natural pace
        assert 1.0 < seconds < 6.0, seconds
    else:  # CSM stops at the 800 ms cap; compressed formats pad a frame or two
        assert 0.75 <= seconds <= 0.9, seconds
    assert np.abs(samples).max() > 0.01  # not silence


async def test_a_streamed_body_arrives_while_the_request_is_still_generating(csm_and_piper):
    server = csm_and_piper
    seen_running: list[bool] = []

    def stream():
        with client_for(server) as client, client.audio.speech.with_streaming_response.create(
                model="tts-1", voice="ash", input="A longer answer that streams. " * 3, response_format="pcm",
                extra_body={"max_audio_length_ms": 4000}) as response:
            chunks = []
            for chunk in response.iter_bytes():
                if not chunks:
                    seen_running.append(bool(server.service.scheduler.running))
                chunks.append(chunk)
            return response.headers, chunks

    headers, chunks = await asyncio.to_thread(stream)
    assert headers["content-type"] == "audio/pcm" and headers.get("transfer-encoding") == "chunked"
    assert seen_running == [True]  # the first bytes came while the server was still generating
    assert len(chunks) > 1 and sum(map(len, chunks)) == 4000 * 24 * 2


async def test_sse_deltas_join_to_the_same_audio_as_the_plain_response(csm_and_piper):
    body = {"model": "tts-1", "voice": "coral", "input": TEXT, "response_format": "pcm", **SHORT}

    def both():
        with client_for(csm_and_piper) as client:
            plain = client.audio.speech.create(**{k: body[k] for k in ("model", "voice", "input", "response_format")},
                                               extra_body=SHORT).content
            with client.audio.speech.with_streaming_response.create(
                    **{k: body[k] for k in ("model", "voice", "input", "response_format")}, stream_format="sse",
                    extra_body=SHORT) as response:
                assert response.headers["content-type"] == "text/event-stream"
                events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
        return plain, events

    plain, events = await asyncio.to_thread(both)
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["output_tokens"] == 10
    joined = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert len(deltas) > 1 and len(joined) == len(plain)
    assert np.abs(np.frombuffer(joined, "<i2").astype(int) - np.frombuffer(plain, "<i2")).max() <= 1


async def test_the_same_seed_gives_the_same_samples_over_http_and_websocket(csm_and_piper):
    def over_http():
        with client_for(csm_and_piper) as client:
            return client.audio.speech.create(model="tts-1", voice="7", input=TEXT, response_format="pcm",
                                              extra_body=SHORT).content

    http_audio = await asyncio.to_thread(over_http)
    async with websockets.connect(url(csm_and_piper)) as ws:
        await ws.send(json.dumps({"text": TEXT, "speaker": 7, "context": False, "format": "pcm", **SHORT}))
        reply, ws_audio, _ = await collect(ws)
    assert reply["engine"] == "csm" and len(http_audio) == len(ws_audio)
    assert np.abs(np.frombuffer(http_audio, "<i2").astype(int) - np.frombuffer(ws_audio, "<i2")).max() <= 1


async def test_a_client_that_disconnects_mid_stream_cancels_its_generation(csm_and_piper):
    server = csm_and_piper
    before = server.service.metrics.interfaces.get("http", {}).get("cancelled", 0)

    def leave_early():
        with client_for(server) as client, client.audio.speech.with_streaming_response.create(
                model="tts-1", voice="echo", input="A long story that nobody will hear the end of. " * 6,
                response_format="pcm", extra_body={"max_audio_length_ms": 60_000}) as response:
            next(response.iter_bytes())  # the first chunk, then hang up

    await asyncio.to_thread(leave_early)
    for _ in range(200):
        if not server.service.scheduler.running:
            break
        await asyncio.sleep(0.05)
    batcher = server.service.scheduler.primary.engine.batcher
    assert not server.service.scheduler.running and batcher.active == {} and sorted(batcher._free) == [0, 1, 2, 3]
    assert server.service.metrics.interfaces["http"]["cancelled"] == before + 1


async def test_voices_models_and_interface_counts_are_listed(csm_and_piper):
    status, voices = await ahttp_get(csm_and_piper.port, "/v1/audio/voices")
    _, legacy = await ahttp_get(csm_and_piper.port, "/v1/audio/voices?legacy=true")
    _, models = await ahttp_get(csm_and_piper.port, "/v1/models")
    _, info = await ahttp_get(csm_and_piper.port, "/v1/info")
    ids = [v["id"] for v in json.loads(voices)["voices"]]
    assert status == 200 and ids[:3] == ["alloy", "ash", "ballad"] and "nova" in ids
    assert json.loads(legacy)["voices"] == ids
    listed = {m["id"]: m["owned_by"] for m in json.loads(models)["data"]}
    assert listed["tts-1"] == "csm-tts-server:csm" and listed["piper"] == "csm-tts-server:piper"
    assert json.loads(models)["object"] == "list"
    assert json.loads(info)["interfaces"]["http"]["success"] > 0


async def test_speed_is_honoured_by_piper_natively_and_by_csm_through_time_stretching(csm_and_piper):
    def speak(model, speed):
        csm = model == "tts-1"  # a shorter text for CSM: the same tokens at both speeds, then stretched
        with client_for(csm_and_piper) as client:
            return client.audio.speech.create(model=model, voice="nova", input="Hi there, friend." if csm else TEXT,
                                              speed=speed, response_format="wav",
                                              extra_body={"seed": 3} if csm else None).content

    normal, _ = decode(await asyncio.to_thread(speak, "piper", 1.0), "wav")
    fast, _ = decode(await asyncio.to_thread(speak, "piper", 2.0), "wav")
    assert 0.4 < len(fast) / len(normal) < 0.75  # phonemes at twice the rate; pauses between sentences stay
    csm, _ = decode(await asyncio.to_thread(speak, "tts-1", 1.0), "wav")
    quick, _ = decode(await asyncio.to_thread(speak, "tts-1", 1.5), "wav")
    assert len(quick) / len(csm) == pytest.approx(1 / 1.5, rel=0.02)  # the same tokens, stretched


async def test_sse_with_timestamps_adds_word_events_and_vtt_srt_are_captions_with_those_times(csm_and_piper):
    import srt
    import webvtt

    def ask():
        with client_for(csm_and_piper) as client:
            with client.audio.speech.with_streaming_response.create(
                    model="piper", voice="alloy", input=TEXT, response_format="pcm", stream_format="sse",
                    extra_body={"timestamps": True}) as response:
                events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
            captions = {fmt: client.audio.speech.create(model="piper", voice="alloy", input=TEXT,
                                                        response_format=fmt) for fmt in ("vtt", "srt")}
        return events, captions

    events, captions = await asyncio.to_thread(ask)
    words = [w for e in events if e["type"] == "speech.words" for w in e["words"]]
    assert [w["word"] for w in words] == TEXT.split() and events[-1]["type"] == "speech.audio.done"
    audio = sum(len(base64.b64decode(e["audio"])) for e in events if e["type"] == "speech.audio.delta") / 48000
    assert all(0 <= w["start_s"] <= w["end_s"] <= audio for w in words)
    assert captions["vtt"].response.headers["content-type"] == "text/vtt"
    cues = webvtt.from_buffer(io.StringIO(captions["vtt"].content.decode()))
    subtitles = list(srt.parse(captions["srt"].content.decode()))
    assert " ".join(c.text for c in cues) == " ".join(s.content for s in subtitles) == TEXT
    assert [c.start for c in cues] == sorted(c.start for c in cues)
    assert subtitles[-1].end.total_seconds() <= audio + 0.5  # another synthesis: Piper varies a little


async def test_captions_from_an_engine_without_word_times_are_refused_saying_why(csm_and_piper):
    def ask():
        with client_for(csm_and_piper) as client:
            client.audio.speech.create(model="csm", voice="alloy", input=TEXT, response_format="vtt")

    with pytest.raises(APIStatusError) as refused:
        await asyncio.to_thread(ask)
    assert refused.value.status_code == 400 and "--stt-model" in refused.value.message


@pytest.mark.parametrize("body, status, param", [
    ({"model": "tts-1", "voice": "alloy"}, 400, "input"),
    ({"model": "tts-1", "input": "Hi"}, 400, "voice"),
    ({"model": "tts-1", "voice": "nobody", "input": "Hi"}, 400, "voice"),  # OpenAI answers an unknown voice with 400
    ({"model": "tts-9", "voice": "alloy", "input": "Hi"}, 404, "model"),
    ({"model": "tts-1", "voice": "alloy", "input": "x" * 4001}, 413, "input"),
    ({"model": "tts-1", "voice": "alloy", "input": "Hi", "response_format": "ogg"}, 400, "response_format"),
    ({"model": "tts-1", "voice": "alloy", "input": "Hi", "speed": 9}, 400, "speed"),
    ({"model": "tts-1", "voice": "alloy", "input": "Hi", "seed": -1}, 400, "seed"),
    ({"model": "tts-1", "voice": "alloy", "input": "Hi", "response_format": "opus", "sample_rate": 22050}, 400,
     "sample_rate"),
    ({"model": "tts-1", "voice": {"id": "nobody"}, "input": "Hi"}, 400, "voice"),
])
async def test_bad_fields_get_openai_shaped_errors_that_name_the_field(csm_and_piper, body, status, param):
    code, reply = await asyncio.to_thread(post, csm_and_piper.port, json.dumps(body).encode())
    error = json.loads(reply)["error"]
    assert code == status and error["param"] == param and error["message"] and "type" in error


def post(port: int, body: bytes, headers: dict | None = None, path: str = "/v1/audio/speech") -> tuple[int, bytes]:
    """A raw HTTP POST (the SDK would refuse to send malformed bodies)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


async def test_keys_limits_and_unavailable_engines_answer_with_their_status(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir, max_batch=4), gate=Gate(("sk-right",)), max_queue=1,
                              rate_limit=3) as server:
        def speak(key: str, **options):
            with client_for(server, key) as client:
                return client.audio.speech.create(model="tts-1", voice="alloy", input="Hi", **options)

        with pytest.raises(APIStatusError) as unauthorized:
            await asyncio.to_thread(speak, "sk-wrong")
        ok = await asyncio.to_thread(speak, "sk-right", response_format="wav", extra_body=SHORT)
        unavailable, _ = await asyncio.to_thread(post, server.port, json.dumps(
            {"model": "piper", "voice": "alloy", "input": "Hi"}).encode(), {"Authorization": "Bearer sk-right"})
        limited = [await asyncio.to_thread(post, server.port, json.dumps(
            {"model": "tts-1", "voice": "alloy", "input": "Hi", **SHORT}).encode(),
            {"Authorization": "Bearer sk-right"}) for _ in range(3)]
    assert unauthorized.value.status_code == 401 and unauthorized.value.body["code"] == "invalid_api_key"
    assert ok.content[:4] == b"RIFF"
    assert unavailable == 503
    assert [code for code, _ in limited][-1] == 429  # 3 a minute: the fourth request of this address
    assert json.loads(limited[-1][1])["error"]["code"] == "rate_limited"


async def test_a_full_queue_is_a_429_with_retry_after(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir, delay=2.0, max_batch=4), max_queue=1,
                              wait_loaded=False) as server:
        waiting = asyncio.create_task(asyncio.to_thread(post, server.port, json.dumps(
            {"model": "tts-1", "voice": "alloy", "input": "First", **SHORT}).encode()))
        while not server.service.scheduler.depth:
            await asyncio.sleep(0.01)

        def overflow():
            import urllib.error
            import urllib.request

            request = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/audio/speech", method="POST",
                                             data=json.dumps({"model": "tts-1", "voice": "alloy",
                                                              "input": "Second"}).encode())
            try:
                urllib.request.urlopen(request, timeout=30)
            except urllib.error.HTTPError as err:
                return err.code, err.headers.get("Retry-After"), json.loads(err.read())["error"]["code"]

        assert await asyncio.to_thread(overflow) == (429, "1", "busy")
        assert (await waiting)[0] == 200


async def test_instructions_naming_an_emotion_and_voice_names_from_voices_json_reach_the_prompt(tiny_model_dir,
                                                                                              tmp_path):
    refs = tmp_path / "refs"
    write_audio(refs / "happy.wav", speechlike(1.0))
    write_audio(refs / "voices" / "narrator.wav", speechlike(2.0, seed=3))
    (refs / "emotion_map.json").write_text('{"happy": [{"path": "happy.wav", "text": "Yay!"}]}')
    (refs / "voices.json").write_text('{"40": {"path": "voices/narrator.wav", "text": "I tell stories.", '
                                      '"name": "narrator"}}')
    async with running_server(csm_slot(tiny_model_dir, max_batch=4), library=ReferenceLibrary(refs)) as server:
        def speak(**options):
            with client_for(server) as client:
                return client.audio.speech.create(model="tts-1", input=TEXT, response_format="pcm",
                                                  extra_body=SHORT, **options).content

        async def over_websocket(**fields):
            async with websockets.connect(url(server)) as ws:
                await ws.send(json.dumps({"text": TEXT, "format": "pcm", **SHORT, **fields}))
                return (await collect(ws))[1]

        plain = await asyncio.to_thread(speak, voice="41")  # speaker 41 has no default voice
        instructed = await asyncio.to_thread(speak, voice="41", instructions="happy")
        ignored = await asyncio.to_thread(speak, voice="41", instructions="Speak like a pirate")
        with_emotion = await over_websocket(speaker=41, emotion="happy", context=False)
        named = await asyncio.to_thread(speak, voice="narrator")
        by_id = await asyncio.to_thread(speak, voice="40")
        with_voice = await over_websocket(speaker=40)  # a fresh connection: the default voice, no history
        without_voice = await over_websocket(speaker=40, context=False)
    assert instructed != plain and instructed == with_emotion  # the happy reference, as on the WebSocket
    assert ignored == plain  # other instructions are accepted and ignored
    assert named == by_id == with_voice != without_voice  # "narrator" is speaker 40 with its default voice


@pytest.mark.parametrize("fmt", ["mp3", "opus"])
async def test_a_streamed_mp3_or_opus_body_is_playable_before_it_ends(csm_and_piper, fmt):
    def first_part():
        with client_for(csm_and_piper) as client, client.audio.speech.with_streaming_response.create(
                model="tts-1", voice="sage", input="Play me while I am still arriving. " * 3, response_format=fmt,
                extra_body={"max_audio_length_ms": 4000}) as response:
            received = b""
            for chunk in response.iter_bytes():
                received += chunk
                if len(received) > 4000:  # well before the end: ~4 s of audio is ~30 KB (mp3) / ~100 KB (opus)
                    return received

    partial = await asyncio.to_thread(first_part)
    with av.open(io.BytesIO(partial)) as container:
        samples = sum(frame.samples for frame in container.decode(audio=0))
    assert samples > 0.1 * 24000 * (2 if fmt == "opus" else 1)  # opus decodes at 48 kHz


async def test_http_and_websocket_requests_share_one_batch(csm_and_piper):
    server = csm_and_piper
    batcher = server.service.scheduler.primary.engine.batcher
    widest: list[int] = []

    def over_http():
        with client_for(server) as client:
            return client.audio.speech.create(model="tts-1", voice="onyx", input="Side by side. " * 4,
                                              response_format="pcm", extra_body={"max_audio_length_ms": 3000}).content

    async def watch():
        while True:
            widest.append(len(batcher.active))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    async with websockets.connect(url(server)) as ws:
        await ws.send(json.dumps({"text": "Side by side. " * 4, "stream": True, "max_audio_length_ms": 3000}))
        http_audio, (reply, _, _) = await asyncio.gather(asyncio.to_thread(over_http), collect(ws))
    watcher.cancel()
    assert reply["status"] == "success" and len(http_audio) == 3000 * 48
    assert max(widest) == 2  # both requests were rows of the same batch at once


async def test_metrics_count_http_requests_under_their_interface(csm_and_piper):
    def speak():
        with client_for(csm_and_piper) as client:
            client.audio.speech.create(model="tts-1", voice="verse", input="Count me", response_format="wav",
                                       extra_body=SHORT)

    await asyncio.to_thread(speak)
    async with websockets.connect(url(csm_and_piper)) as ws:
        await ws.send(json.dumps({"text": "Count me too", **SHORT}))
        await collect(ws)
    _, metrics = await ahttp_get(csm_and_piper.port, "/metrics")
    assert 'tts_interface_requests_total{interface="http",status="success"}' in metrics
    assert 'tts_interface_requests_total{interface="websocket",status="success"}' in metrics


async def test_a_body_over_256_kib_is_refused_with_413(csm_and_piper):
    body = json.dumps({"model": "tts-1", "voice": "alloy", "input": "x" * (300 * 1024)}).encode()
    status, reply = await asyncio.to_thread(post, csm_and_piper.port, body)
    assert status == 413 and "too large" in json.loads(reply)["error"]["message"]
