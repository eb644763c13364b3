"""The Wyoming protocol (Home Assistant's) on its own port, driven by the ``wyoming`` package's own client."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from urllib.parse import urlparse

import numpy as np
import pytest
import pytest_asyncio
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event, async_read_event
from wyoming.info import Describe, Info
from wyoming.ping import Ping
from wyoming.tts import (Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop,
                         SynthesizeVoice)

from conftest import ServerProcess, ahttp_get, csm_slot, free_port, piper_slot, running_server
from tts_server.audio.text import estimate_ms, frames_for_ms

pytestmark = pytest.mark.asyncio(loop_scope="module")
RATE = 24000


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tiny_model_dir):
    """CSM on the CPU default (batched, 4 rows) with Piper as fallback, and Wyoming beside the WebSocket."""
    async with running_server(csm_slot(tiny_model_dir, max_batch=4), piper_slot(),
                              wyoming_uri=f"tcp://127.0.0.1:{free_port()}", max_text_chars=1000) as server:
        yield server


def client(server) -> AsyncTcpClient:
    return AsyncTcpClient("127.0.0.1", urlparse(server.wyoming.uri).port)


async def read(c: AsyncTcpClient, timeout: float = 60) -> Event | None:
    return await asyncio.wait_for(c.read_event(), timeout)


async def read_until(c: AsyncTcpClient, last: str) -> list[Event]:
    """Events up to and including the first of type ``last``."""
    events = []
    while True:
        event = await read(c)
        assert event is not None, f"connection closed before {last}: {[e.type for e in events]}"
        events.append(event)
        if event.type == last:
            return events


def pcm_of(events: list[Event]) -> np.ndarray:
    return np.frombuffer(b"".join(AudioChunk.from_event(e).audio for e in events if AudioChunk.is_type(e.type)),
                         "<i2")


async def test_describe_lists_a_streaming_program_per_engine_with_its_voices(server):
    async with client(server) as c:
        await c.write_event(Describe().event())
        info = Info.from_event(await read(c))
    csm, piper = info.tts
    assert (csm.name, piper.name) == ("csm", "piper")
    for program in info.tts:
        assert program.installed and program.supports_synthesize_streaming and program.version
        assert program.attribution.name and program.attribution.url.startswith("https://")
    names = [v.name for v in csm.voices]
    assert names[:3] == ["alloy", "ash", "ballad"] and "speaker" in names
    assert all(v.languages == ["en"] and v.installed for v in csm.voices)
    by_id = next(v for v in csm.voices if v.name == "speaker")
    assert [s.name for s in by_id.speakers][:3] == ["0", "1", "2"]
    assert [(v.name, v.languages) for v in piper.voices] == [("en_US-joe-medium", ["en_US"])]
    assert (by_id.description, piper.voices[0].description) == ("CSM-1B by speaker id", "Piper en_US-joe-medium")


async def test_synthesize_streams_16bit_mono_audio_events_of_plausible_length(server):
    text = "Hello from the voice assistant."
    async with client(server) as c:
        await c.write_event(Synthesize(text=text, voice=SynthesizeVoice(name="alloy")).event())
        events = await read_until(c, AudioStop().event().type)
    start = AudioStart.from_event(events[0])
    assert (start.rate, start.width, start.channels) == (RATE, 2, 1)
    chunks = [AudioChunk.from_event(e) for e in events if AudioChunk.is_type(e.type)]
    assert len(chunks) > 1  # streamed as generated: the first chunk is CSM's first two frames
    assert all((ch.rate, ch.width, ch.channels) == (RATE, 2, 1) for ch in chunks)
    assert len(chunks[0].audio) == 2 * int(0.16 * RATE)
    assert [e.type for e in events[1:-1]] == ["audio-chunk"] * len(chunks)
    seconds = len(pcm_of(events)) / RATE
    assert 0.16 <= seconds <= frames_for_ms(estimate_ms(text)) * 0.08 and np.abs(pcm_of(events)).max() > 0
    assert server.service.metrics.interfaces["wyoming"]["success"] >= 1


async def test_piper_voice_name_asks_for_piper(server):
    before = server.service.metrics.stats["piper"].requests if "piper" in server.service.metrics.stats else 0
    async with client(server) as c:
        await c.write_event(Synthesize(text="The lights are off.",
                                       voice=SynthesizeVoice(name="en_US-joe-medium")).event())
        events = await read_until(c, "audio-stop")
    seconds = len(pcm_of(events)) / RATE
    assert 0.5 < seconds < 4 and server.service.metrics.stats["piper"].requests == before + 1


async def test_a_streamed_reply_is_spoken_as_its_sentences_complete_in_one_audio_stream(server):
    """Text chunks split mid-word: the first sentence is heard before synthesize-stop is even sent, and the reply
    is one generation: one audio-start, one audio-stop, then synthesize-stopped."""
    async with client(server) as c:
        await c.write_event(SynthesizeStart(voice=SynthesizeVoice(name="nova")).event())
        for piece in ("The weather to", "day is sunny and", " warm. Tomorrow it will"):
            await c.write_event(SynthesizeChunk(text=piece).event())
        first = await read_until(c, "audio-chunk")  # the reply is not finished, yet audio arrives
        assert first[0].type == "audio-start"
        await c.write_event(SynthesizeChunk(text=" rain in the evening.").event())
        # Home Assistant repeats the whole text as a plain synthesize for old servers: it must not be spoken again
        await c.write_event(Synthesize(text="The weather today is sunny and warm. Tomorrow it will rain in the "
                                            "evening.").event())
        await c.write_event(SynthesizeStop().event())
        events = first + await read_until(c, "synthesize-stopped")
        connection = next(iter(server.wyoming.connections))
        spoken = [turn.text for turn in connection.conversation.history]
    types = [e.type for e in events]
    assert types == ["audio-start", *["audio-chunk"] * (len(types) - 3), "audio-stop", "synthesize-stopped"]
    # both sentences were spoken with this connection's context (the first is in the second's prompt): one voice
    assert spoken == ["The weather today is sunny and warm.", "Tomorrow it will rain in the evening."]


def seeded(monkeypatch, seed: int) -> None:
    """Wyoming carries no seed: give every request this server builds one (a whole synthesize's and a stream's
    alike go through ``Synthesize.to_request``), so that two generations can be compared sample for sample."""
    from tts_server.api import wyoming_events

    to_request = wyoming_events.Synthesize.to_request
    monkeypatch.setattr(wyoming_events.Synthesize, "to_request",
                        lambda self: dataclasses.replace(to_request(self), seed=seed))


SPOKEN = "The lights in the kitchen are off.\nThe front door is locked, and the alarm is set.  All is well."


async def spoken_whole(server, text: str) -> tuple[list[Event], list[str]]:
    async with client(server) as c:
        await c.write_event(Synthesize(text=text).event())
        events = await read_until(c, "audio-stop")
        history = [turn.text for turn in next(iter(server.wyoming.connections)).conversation.history]
    return events, history


async def test_a_streamed_reply_is_one_generation_with_the_whole_texts_seeded_audio(server, monkeypatch):
    """The same text cut anywhere (mid-word, at its newline, between a period and the next word) and streamed is
    the same sentences and the same seeded audio as sent whole: one decoder across its sentences, no seam.  A
    different seed gives other audio (the comparison can fail)."""
    seeded(monkeypatch, 5)
    whole, whole_history = await spoken_whole(server, SPOKEN)
    async with client(server) as c:
        await c.write_event(SynthesizeStart().event())
        for piece in ("The li", "ghts in the kitchen are off.", "\nThe front", " door is locked, and the a",
                      "larm is set. ", " All is well", "."):
            await c.write_event(SynthesizeChunk(text=piece).event())
        await c.write_event(SynthesizeStop().event())
        streamed = await read_until(c, "synthesize-stopped")
        history = [turn.text for turn in next(iter(server.wyoming.connections)).conversation.history]
    seeded(monkeypatch, 6)
    other, _ = await spoken_whole(server, SPOKEN)
    types = [e.type for e in streamed]
    assert types.count("audio-start") == types.count("audio-stop") == 1 and types[-1] == "synthesize-stopped"
    assert history == whole_history == ["The lights in the kitchen are off.",
                                        "The front door is locked, and the alarm is set.", "All is well."]
    assert len(pcm_of(whole)) > 0 and np.array_equal(pcm_of(streamed), pcm_of(whole))
    assert not np.array_equal(pcm_of(other), pcm_of(whole))


async def test_requests_around_a_stream_are_answered_in_the_order_they_were_sent(server):
    """A synthesize, a stream, a synthesize, sent at once: answered in that order, each generation with the ones
    before it as context (the stream's job waits for its turn even though its first sentence is complete)."""
    async with client(server) as c:
        await c.write_event(Synthesize(text="The first reply is here.").event())
        await c.write_event(SynthesizeStart().event())
        await c.write_event(SynthesizeChunk(text="The second reply is streamed. It has two sentences.").event())
        await c.write_event(SynthesizeStop().event())
        await c.write_event(Synthesize(text="The third reply comes last.").event())
        first = [e.type for e in await read_until(c, "audio-stop")]
        second = [e.type for e in await read_until(c, "synthesize-stopped")]
        third = [e.type for e in await read_until(c, "audio-stop")]
        history = [turn.text for turn in next(iter(server.wyoming.connections)).conversation.history]
    for types in (first, second[:-1], third):
        assert types[0] == "audio-start" and types[-1] == "audio-stop" and set(types[1:-1]) == {"audio-chunk"}
    assert history == ["The first reply is here.", "The second reply is streamed.", "It has two sentences.",
                       "The third reply comes last."]


STORY = "A long story that nobody will hear the end of. " * 20


@pytest.mark.parametrize("events", [[SynthesizeStart().event(), SynthesizeChunk(text=STORY).event()],
                                    [Synthesize(text=STORY).event()]], ids=["stream", "whole"])
async def test_a_client_that_disconnects_mid_reply_cancels_its_generation(server, events):
    before = server.service.metrics.interfaces.get("wyoming", {}).get("cancelled", 0)
    async with client(server) as c:
        for event in events:
            await c.write_event(event)
        await read_until(c, "audio-chunk")
    for _ in range(400):
        if not server.service.scheduler.running and not server.wyoming.live():
            break
        await asyncio.sleep(0.05)
    batcher = server.service.scheduler.primary.engine.batcher
    assert not server.service.scheduler.running and batcher.active == {} and sorted(batcher._free) == [0, 1, 2, 3]
    assert server.service.metrics.interfaces["wyoming"]["cancelled"] == before + 1


async def raw_exchange(server, lines: list[bytes], until: set[str]) -> list[Event]:
    """Write raw lines and a ``ping`` on a plain socket, then read answers until each type in ``until`` came."""
    reader, writer = await asyncio.open_connection("127.0.0.1", urlparse(server.wyoming.uri).port)
    try:
        writer.write(b"".join(lines) + json.dumps(Ping(text="end").event().to_dict()).encode() + b"\n")
        events = []
        while True:
            event = await asyncio.wait_for(async_read_event(reader), 30)
            assert event is not None, f"closed after {[e.data for e in events]}"
            events.append(event)
            if until <= {e.type for e in events}:
                return events
    finally:
        writer.close()


async def test_malformed_events_get_error_events_and_the_connection_lives_on(server):
    events = await raw_exchange(server, [
        b"this is not json\n",
        b"[1, 2, 3]\n",
        b'{"type": "synthesize", "data": 5}\n',
        b'{"type": "synthesize-chunk", "data": {"text": "outside a stream"}}\n',
        b'{"type": "synthesize-start", "data": {"voice": "not an object"}}\n',
        b'{"type": "synthesize-stop"}\n',  # ends the refused stream: answered with synthesize-stopped
        b'{"type": "some-future-event", "data": {}}\n',  # unknown events are ignored, as Wyoming servers do
        b'{"type": "describe"}\n',
    ], until={"pong", "synthesize-stopped"})
    errors = [Error.from_event(e) for e in events if Error.is_type(e.type)]
    assert [e.code for e in errors] == ["invalid_json", "invalid_json", "invalid_json", "invalid_request",
                                        "invalid_request"]
    assert all(e.text for e in errors)
    # info and pong answer at once; synthesize-stopped comes in turn after the (empty) stream's audio
    assert sorted(e.type for e in events if not Error.is_type(e.type)) == ["info", "pong", "synthesize-stopped"]


@pytest.mark.parametrize("voice, code", [(SynthesizeVoice(name="no-such-voice"), "invalid_request"),
                                         (SynthesizeVoice(name="alloy", speaker="x"), "invalid_request"),
                                         (SynthesizeVoice(language="de_DE"), "unsupported_language")])
async def test_a_refused_synthesize_gets_an_error_then_the_connection_ends(server, voice, code):
    """Home Assistant reads until audio-stop or the connection's end: the end tells it at once."""
    async with client(server) as c:
        await c.write_event(Synthesize(text="Hello there.", voice=voice).event())
        error = Error.from_event(await read(c))
        assert await read(c) is None
    assert error.code == code and ("no-such-voice" not in error.text or "alloy" in error.text)


async def test_text_over_the_limit_is_text_too_long(server):
    async with client(server) as c:
        await c.write_event(Synthesize(text="word " * 300).event())
        error = Error.from_event(await read(c))
    assert error.code == "text_too_long"


async def test_wyoming_requests_are_counted_per_interface_in_metrics(server):
    _, metrics = await ahttp_get(server.port, "/metrics")
    assert 'tts_interface_requests_total{interface="wyoming",status="success"}' in metrics


async def test_zeroconf_announces_the_wyoming_port(tiny_model_dir):
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    port = free_port()
    async with running_server(piper_slot(), wyoming_uri=f"tcp://127.0.0.1:{port}",
                              wyoming_zeroconf=f"csm-test-{port}"):
        browser = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
        try:
            found = AsyncServiceInfo("_wyoming._tcp.local.", f"csm-test-{port}._wyoming._tcp.local.")
            for _ in range(6):  # mDNS answers can take seconds on a loaded machine
                if await found.async_request(browser.zeroconf, 5000):
                    break
            else:
                pytest.fail("the service was not announced")
        finally:
            await browser.async_close()
    assert found.port == port and found.parsed_addresses() == ["127.0.0.1"]


async def test_run_server_with_wyoming_uri_speaks_piper_to_a_wyoming_client(tmp_path):
    port = free_port()
    server = ServerProcess(tmp_path, ["--engine", "piper", "--wyoming-uri", f"tcp://127.0.0.1:{port}"])
    try:
        await asyncio.to_thread(server.wait_for_log, "piper ready")
        async with AsyncTcpClient("127.0.0.1", port) as c:
            await c.write_event(Synthesize(text="Home Assistant is listening.").event())
            events = await read_until(c, "audio-stop")
    finally:
        log = await asyncio.to_thread(server.stop)
    assert "Wyoming listening on tcp://127.0.0.1" in log
    assert len(pcm_of(events)) / RATE > 0.5


async def test_a_client_that_half_closes_after_its_request_still_gets_all_its_audio(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", urlparse(server.wyoming.uri).port)
    synthesize = Synthesize(text="Short and sweet.", voice=SynthesizeVoice(name="en_US-joe-medium")).event()
    writer.write(json.dumps(synthesize.to_dict()).encode() + b"\n")
    writer.write_eof()  # nothing more is coming; the answer must still come
    events = []
    while (event := await asyncio.wait_for(async_read_event(reader), 30)) is not None:
        events.append(event.type)
    writer.close()
    assert events[0] == "audio-start" and events[-1] == "audio-stop" and "audio-chunk" in events


async def test_a_unix_socket_uri_serves_wyoming_too(tmp_path):
    from wyoming.client import AsyncUnixClient

    path = tmp_path / "wyoming.sock"
    async with running_server(piper_slot(), wyoming_uri=f"unix://{path}"):
        async with AsyncUnixClient(str(path)) as c:
            await c.write_event(Describe().event())
            info = Info.from_event(await read(c))
            await c.write_event(Synthesize(text="Over a local socket.").event())
            events = await read_until(c, "audio-stop")
    assert [p.name for p in info.tts] == ["piper"] and len(pcm_of(events)) > 0


async def test_a_failed_csm_is_left_out_of_the_info_and_piper_answers_csm_voices(broken_model_dir):
    async with running_server(csm_slot(broken_model_dir), piper_slot(),
                              wyoming_uri=f"tcp://127.0.0.1:{free_port()}") as server:
        async with client(server) as c:
            await c.write_event(Describe().event())
            info = Info.from_event(await read(c))
            await c.write_event(Synthesize(text="Falling back.", voice=SynthesizeVoice(name="alloy")).event())
            events = await read_until(c, "audio-stop")
    assert [p.name for p in info.tts] == ["piper"]
    assert len(pcm_of(events)) > 0 and server.service.metrics.stats["piper"].requests == 1


async def test_an_event_declaring_a_huge_payload_is_refused_before_it_is_read(server):
    """300 MB declared: nothing is buffered, an error says why, the connection ends, the server serves on."""
    host, port = "127.0.0.1", urlparse(server.wyoming.uri).port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        header = {"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1},
                  "payload_length": 300 * 2**20}
        writer.write(json.dumps(header).encode() + b"\n" + b"\0" * 65536)  # the first bytes of the payload
        await writer.drain()
        error = await asyncio.wait_for(async_read_event(reader), 10)
        assert Error.is_type(error.type) and "payload_length" in Error.from_event(error).text
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed
    finally:
        writer.close()
    async with client(server) as c:
        await c.write_event(Ping().event())
        assert (await read(c)).type == "pong"


async def test_deeply_nested_json_is_an_error_event_and_the_connection_lives_on(server):
    events = await raw_exchange(server, [b'{"type": "ping", "data": ' + b"[" * 5000 + b"\n",
                                         b'{"type": "ping", "data": {}}\n'], until={"pong"})
    assert [e.type for e in events] == ["error", "pong"]
    assert Error.from_event(events[0]).code == "invalid_json"


async def test_a_stream_counts_once_against_the_rate_limit_however_many_sentences_it_has():
    """At --rate-limit 1: a stream of 40 sentences is spoken whole, as one job (one token, one engine request);
    the next synthesize-start, at once, is rate_limited (a token comes back after 60 s)."""
    async with running_server(piper_slot(), wyoming_uri=f"tcp://127.0.0.1:{free_port()}", rate_limit=1) as server:
        async with client(server) as c:
            await c.write_event(SynthesizeStart(voice=SynthesizeVoice(name="piper")).event())
            for i in range(40):
                await c.write_event(SynthesizeChunk(text=f"Sentence number {i}. ").event())
            await c.write_event(SynthesizeStop().event())
            events = await read_until(c, "synthesize-stopped")
            await c.write_event(SynthesizeStart(voice=SynthesizeVoice(name="piper")).event())
            refused = Error.from_event(await read(c))
        requests = server.service.metrics.stats["piper"].requests
    types = [e.type for e in events]
    assert "error" not in types and types.count("audio-start") == types.count("audio-stop") == 1
    assert len(pcm_of(events)) / RATE > 40 * 0.5 and requests == 1  # every sentence, in one generation
    assert refused.code == "rate_limited"


async def test_a_stream_over_the_text_limit_ends_with_text_too_long_and_the_connection_lives_on():
    """--max-text-chars 100 bounds a stream's whole text: the chunk that crosses it ends the stream (its sentences
    before it were spoken), an error says why before its audio-stop, synthesize-stop is still answered, and the
    connection serves on."""
    async with running_server(piper_slot(), wyoming_uri=f"tcp://127.0.0.1:{free_port()}",
                              max_text_chars=100) as server:
        async with client(server) as c:
            await c.write_event(SynthesizeStart(voice=SynthesizeVoice(name="piper")).event())
            for _ in range(5):  # 22 characters each: the fifth crosses 100
                await c.write_event(SynthesizeChunk(text="This is one sentence. ").event())
            await c.write_event(SynthesizeChunk(text="Dropped: the stream has ended.").event())
            await c.write_event(SynthesizeStop().event())
            events = await read_until(c, "synthesize-stopped")
            await c.write_event(Ping(text="still here").event())
            pong = await read(c)
    types = [e.type for e in events]
    assert types[0] == "audio-start" and types[-3:] == ["error", "audio-stop", "synthesize-stopped"]
    assert Error.from_event(events[-3]).code == "text_too_long" and types.count("error") == 1
    assert pong.type == "pong"


async def test_a_stalled_stream_ends_with_text_timeout_and_the_connection_lives_on():
    """--text-timeout 1: a stream that completes no sentence ends text_timeout (no audio); one whose first sentence
    was spoken and then stalls ends so after its audio.  Each synthesize-stop is still answered."""
    async with running_server(piper_slot(), wyoming_uri=f"tcp://127.0.0.1:{free_port()}",
                              text_timeout=1.0) as server:
        async with client(server) as c:
            await c.write_event(SynthesizeStart(voice=SynthesizeVoice(name="piper")).event())
            await c.write_event(SynthesizeChunk(text="Half a sent").event())
            silent = [await read(c)]
            await c.write_event(SynthesizeStop().event())
            silent.append(await read(c))
            await c.write_event(SynthesizeStart(voice=SynthesizeVoice(name="piper")).event())
            await c.write_event(SynthesizeChunk(text="One sentence is here. And then nothing more").event())
            spoken = await read_until(c, "error")
            spoken.append(await read(c))
            await c.write_event(SynthesizeStop().event())
            spoken.append(await read(c))
    assert [e.type for e in silent] == ["error", "synthesize-stopped"]
    assert Error.from_event(silent[0]).code == Error.from_event(spoken[-3]).code == "text_timeout"
    assert spoken[0].type == "audio-start" and [e.type for e in spoken[-2:]] == ["audio-stop", "synthesize-stopped"]
    assert len(pcm_of(spoken)) / RATE > 0.5


async def test_a_stream_with_nothing_to_speak_gets_synthesize_stopped_alone(server):
    """No chunk, or chunks with no letter or digit: no audio and no error, as wyoming-piper answers."""
    async with client(server) as c:
        for chunks in ([], [" ", "\u2014 ", "\n"]):
            await c.write_event(SynthesizeStart().event())
            for chunk in chunks:
                await c.write_event(SynthesizeChunk(text=chunk).event())
            await c.write_event(SynthesizeStop().event())
            assert (await read(c)).type == "synthesize-stopped"
        await c.write_event(Ping().event())
        assert (await read(c)).type == "pong"


async def test_a_client_that_half_closes_inside_a_stream_still_gets_its_audio(server):
    """No synthesize-stop will come: the text so far is the whole reply, spoken, and the connection then ends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", urlparse(server.wyoming.uri).port)
    for event in (SynthesizeStart(voice=SynthesizeVoice(name="en_US-joe-medium")).event(),
                  SynthesizeChunk(text="Short and sweet, and never").event(), SynthesizeChunk(text=" stopped").event()):
        writer.write(json.dumps(event.to_dict()).encode() + b"\n")
    writer.write_eof()
    events = []
    while (event := await asyncio.wait_for(async_read_event(reader), 30)) is not None:
        events.append(event.type)
    writer.close()
    assert events[0] == "audio-start" and events[-1] == "audio-stop" and "audio-chunk" in events


HUGE_SPEAKER = "7" * 5000  # more digits than Python's int() reads (4,300)


async def test_a_stream_with_a_5000_digit_speaker_is_an_error_event_and_the_connection_lives_on(server):
    async with client(server) as c:
        await c.write_event(SynthesizeStart(voice=SynthesizeVoice(name="speaker", speaker=HUGE_SPEAKER)).event())
        error = Error.from_event(await read(c))
        await c.write_event(SynthesizeStop().event())
        stopped = await read(c)
        await c.write_event(Ping(text="still here").event())
        pong = await read(c)
    assert error.code == "invalid_request" and "'speaker'" in error.text and len(error.text) < 300
    assert (stopped.type, pong.type) == ("synthesize-stopped", "pong")


async def test_a_synthesize_with_a_5000_digit_speaker_is_refused_like_any_bad_voice(server):
    async with client(server) as c:
        await c.write_event(Synthesize(text="Hello there.",
                                       voice=SynthesizeVoice(name="speaker", speaker=HUGE_SPEAKER)).event())
        error = Error.from_event(await read(c))
        assert await read(c) is None  # a refused synthesize ends the connection (Home Assistant waits for it)
    assert error.code == "invalid_request"


async def test_an_unexpected_failure_in_the_handler_is_an_internal_error_event_and_the_connection_lives_on(
        server, monkeypatch):
    """The catch-all, as on the WebSocket: a bug costs one reply, not the connection (the fault is injected)."""
    def broken():
        raise RuntimeError("a bug in building the info")

    monkeypatch.setattr(server.wyoming, "info", broken)
    async with client(server) as c:
        await c.write_event(Describe().event())
        error = Error.from_event(await read(c))
        await c.write_event(Ping().event())
        pong = await read(c)
    assert error.code == "internal_error" and "bug" not in error.text and pong.type == "pong"


async def test_describe_while_piper_loads_lists_its_voices_from_the_voice_files():
    """Home Assistant reads the info once at set-up: a loading engine's voices must already be there."""
    from tts_server.core.jobs import EngineSlot
    from tts_server.engines.piper import PiperEngine

    class SlowPiper(PiperEngine):
        def load(self) -> None:
            import time

            time.sleep(3)
            super().load()

    async with running_server(EngineSlot(SlowPiper()), wait_loaded=False,
                              wyoming_uri=f"tcp://127.0.0.1:{free_port()}") as server:
        async with client(server) as c:
            await c.write_event(Describe().event())
            info = Info.from_event(await read(c))
        assert server.service.scheduler.primary.state == "loading"
    (program,) = info.tts
    assert [(v.name, v.languages) for v in program.voices] == [("en_US-joe-medium", ["en_US"])]
