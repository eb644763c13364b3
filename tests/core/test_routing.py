"""The engine chain on a real server: overflow when the queue is full, and language routing across engines and
Piper voices (two voice files), over WebSocket, the OpenAI SDK and Wyoming."""

from __future__ import annotations

import asyncio
import json

import pytest
import pytest_asyncio
import websockets
from openai import OpenAI

from conftest import (ahttp_get, collect, csm_slot, free_port, piper_slot, piper_voice_in, recv_json, reply_json,
                      running_server, url)
from tts_server.engines.piper import default_voice

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_a_full_queue_sends_requests_that_named_no_engine_to_the_overflow_engine(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir, max_batch=4), piper_slot(), max_queue=1,
                              overflow_engine="piper") as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"text": "A long first request.", "request_id": "long", "stream": True,
                                      "seed": 1, "max_audio_length_ms": 60000}))
            assert (await recv_json(ws))["status"] == "start"  # running: the requests below wait behind it
            for request_id, engine in (("queued", None), ("named", "csm"), ("overflow", None)):
                await ws.send(json.dumps({"text": "Hello there.", "request_id": request_id, "seed": 2,
                                          "max_audio_length_ms": 400, **({"engine": engine} if engine else {})}))
            refused = {}
            while refused.get("request_id") != "named":  # rejections are sent at once, between the audio
                frame = await asyncio.wait_for(ws.recv(), 60)
                refused = reply_json(frame) if isinstance(frame, str) else {}
            assert refused["status"] == "error" and refused["code"] == "busy"
            await ws.send(json.dumps({"type": "cancel", "request_id": "long"}))
            answered = {}
            for request_id in ("long", "queued", "overflow"):
                reply, audio, _ = await collect(ws, request_id)
                answered[request_id] = (reply["status"], reply.get("engine"))
        assert answered == {"long": ("cancelled", None), "queued": ("success", "csm"),
                            "overflow": ("success", "piper")}
        status, body = await ahttp_get(server.port, "/v1/info")
        engines = json.loads(body)["engines"]
        assert engines["piper"]["overflow"] and engines["piper"]["stats"]["fallbacks"] == 1
        assert engines["csm"]["stats"]["fallbacks"] == 0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def two_languages(tiny_model_dir, tmp_path_factory):
    """CSM (English), then Piper with two voice files: en_US (the packaged voice) and de_DE."""
    german = piper_voice_in("de_DE", tmp_path_factory.mktemp("voices"))
    async with running_server(csm_slot(tiny_model_dir, max_batch=4), piper_slot(default_voice(), german),
                              wyoming_uri=f"tcp://127.0.0.1:{free_port()}") as server:
        yield server


async def ask(server, **request) -> dict:
    async with websockets.connect(url(server)) as ws:
        await ws.send(json.dumps({"max_audio_length_ms": 400, "seed": 3, **request}))
        reply, audio, _ = await collect(ws)
        assert reply["status"] != "success" or audio
        return reply


@pytest.mark.parametrize("request_, engine, voice", [
    ({"language": "de"}, "piper", "de_DE-joe-test"),
    ({"language": "de-DE"}, "piper", "de_DE-joe-test"),
    ({"language": "en_GB"}, "csm", None),
    ({}, "csm", None),
    ({"language": "en", "engine": "piper"}, "piper", "en_US-joe-medium"),
    ({"engine": "piper"}, "piper", "en_US-joe-medium"),
])
async def test_a_request_language_picks_the_engine_and_voice_that_speak_it(two_languages, request_, engine, voice):
    reply = await ask(two_languages, text="Guten Tag. Good day.", **request_)
    assert reply["status"] == "success" and reply["engine"] == engine
    assert reply.get("voice") == voice


@pytest.mark.parametrize("request_, listed", [
    ({"language": "fr"}, "this server speaks: de_DE, en, en_US"),
    ({"language": "de", "engine": "csm"}, "engine 'csm' speaks: en"),
])
async def test_a_language_no_engine_speaks_gets_unsupported_language_listing_what_is_spoken(two_languages, request_,
                                                                                           listed):
    reply = await ask(two_languages, text="Bonjour.", **request_)
    assert reply["status"] == "error" and reply["code"] == "unsupported_language" and listed in reply["message"]


async def test_a_malformed_language_is_an_invalid_request(two_languages):
    reply = await ask(two_languages, text="Hello.", language="english please")
    assert reply["code"] == "invalid_request" and "'language'" in reply["message"]


async def test_info_and_the_voice_list_name_every_language(two_languages):
    info = json.loads((await ahttp_get(two_languages.port, "/v1/info"))[1])
    assert info["languages"] == ["de_DE", "en", "en_US"]
    assert [v["language"] for v in info["engines"]["piper"]["voices"]] == ["en_US", "de_DE"]
    voices = json.loads((await ahttp_get(two_languages.port, "/v1/audio/voices"))[1])
    assert voices["languages"] == ["de_DE", "en", "en_US"]


async def test_the_openai_sdk_routes_by_language_and_says_which_engine_answered(two_languages):
    def speak(language: str):
        with OpenAI(base_url=f"http://127.0.0.1:{two_languages.port}/v1", api_key="x", max_retries=0) as client, \
                client.audio.speech.with_streaming_response.create(
                    model="tts-1", voice="alloy", input="Guten Tag.", response_format="pcm",
                    extra_body={"language": language, "max_audio_length_ms": 400}) as response:
            return response.headers["x-tts-engine"], b"".join(response.iter_bytes())

    assert (await asyncio.to_thread(speak, "de"))[0] == "piper"
    assert (await asyncio.to_thread(speak, "en"))[0] == "csm"



async def test_wyoming_lists_each_piper_voice_with_its_language_and_routes_by_language(two_languages):
    from wyoming.client import AsyncTcpClient
    from wyoming.error import Error
    from wyoming.info import Describe, Info
    from wyoming.tts import Synthesize, SynthesizeVoice

    port = int(two_languages.wyoming.uri.rsplit(":", 1)[1])

    async def events_for(event) -> list:
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(event)
            events = []
            while (got := await asyncio.wait_for(client.read_event(), 60)) is not None:
                events.append(got)
                if got.type in ("audio-stop", "info", "error"):
                    return events
            return events

    info = Info.from_event((await events_for(Describe().event()))[-1])
    piper = next(p for p in info.tts if p.name == "piper")
    assert [(v.name, v.languages) for v in piper.voices] == [("en_US-joe-medium", ["en_US"]),
                                                              ("de_DE-joe-test", ["de_DE"])]
    before = two_languages.service.metrics.stats.get("piper")
    before = before.requests if before else 0
    for voice in (SynthesizeVoice(language="de"), SynthesizeVoice(name="de_DE-joe-test")):
        events = await events_for(Synthesize(text="Guten Tag.", voice=voice).event())
        assert events[-1].type == "audio-stop" and len(events) > 2
    assert two_languages.service.metrics.stats["piper"].requests == before + 2
    error = Error.from_event((await events_for(Synthesize(text="Bonjour.",
                                                          voice=SynthesizeVoice(language="fr")).event()))[-1])
    assert error.code == "unsupported_language" and "de_DE" in error.text
