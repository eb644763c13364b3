"""Text that streams in (issue 30, item 1), attacked as a busy or hostile client would, over the real WebSocket and
Wyoming against a real server: a stream's opening text, pieces with nothing to speak, a writer that pauses between
sentences for less than ``--text-timeout``, a shutdown or a refused language while a stream is open, a refused
piece seen by the integrations' client, the text limit exactly, and cancels and closes at every moment.  Piper
answers where the audio itself is not compared (fast, and it makes no audio of punctuation alone); no test asserts
a wall-clock time (timeouts only stop a hang)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import websockets
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.ping import Ping
from wyoming.tts import SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from conftest import collect, csm_slot, free_port, piper_slot, recv_json, running_server, url


def opened(request_id: str, **options) -> str:
    return json.dumps({"type": "synthesize", "request_id": request_id, "text_stream": True, **options})


def piece(request_id: str, delta: str, flush: bool = False) -> str:
    return json.dumps({"type": "text", "request_id": request_id, "delta": delta, "flush": flush})


def ended(request_id: str) -> str:
    return json.dumps({"type": "text_end", "request_id": request_id})


async def first_audio(ws, timeout: float = 30) -> list[dict]:
    """Read up to the first binary frame (the stream is being spoken); the JSON replies before it."""
    replies = []
    while not isinstance(frame := await asyncio.wait_for(ws.recv(), timeout), bytes):
        replies.append(json.loads(frame))
    return replies


async def test_a_streams_opening_text_keeps_its_trailing_space_so_its_words_are_the_whole_texts():
    """The synthesize's ``text`` is the stream's beginning (docs/protocol.md): an LLM's first token "Good morning to "
    then "you all.".  Its trailing space is part of the text: the words spoken are those of the whole text, not
    "toyou" (the opening text is stripped as a whole text would be, so the space is lost)."""
    async with running_server(piper_slot()) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(opened("open", text="Good morning to ", timestamps=True, stream=True))
            await ws.send(piece("open", "you all, my friends."))
            await ws.send(ended("open"))
            done, audio, others = await collect(ws, "open")
    words = [word["word"] for reply in others if reply["status"] == "words" for word in reply["words"]]
    assert done["status"] == "success" and audio
    assert words == ["Good", "morning", "to", "you", "all,", "my", "friends."], words


async def test_a_stream_whose_only_text_is_flushed_punctuation_ends_as_nothing_to_speak():
    """"?!" flushed, then text_end: the stream had nothing to speak, which the protocol answers ``invalid_request``
    ("nothing to speak"), as for a stream ended without a flush.  The flush must not hand the engine a sentence with
    no letter or digit (Piper answered ``generation_failed``, an engine fault; CSM spoke noise).  The connection
    serves on."""
    async with running_server(piper_slot()) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(opened("punct", stream=True))
            await ws.send(piece("punct", "?!", flush=True))
            await ws.send(ended("punct"))
            flushed, audio, _ = await collect(ws, "punct")
            await ws.send(opened("plain", stream=True))
            await ws.send(piece("plain", "?!"))
            await ws.send(ended("plain"))
            plain, _, _ = await collect(ws, "plain")
            await ws.send(json.dumps({"text": "Still here.", "request_id": "after"}))
            after, _, _ = await collect(ws, "after")
    assert plain["code"] == "invalid_request" and "nothing to speak" in plain["message"]
    assert flushed["status"] == "error" and flushed["code"] == "invalid_request", flushed
    assert "nothing to speak" in flushed["message"] and not audio
    assert after["status"] == "success"


async def test_a_writer_pausing_between_sentences_within_the_text_timeout_is_not_abandoned_by_the_watchdog():
    """--text-timeout 10, --generation-timeout 1: a stream's first sentence is spoken, its writer (an LLM calling a
    tool) pauses 2.5 s, then writes the second and ends.  The protocol lets the worker wait up to the text timeout
    for the next sentence; the scheduler's watchdog must not take the wait for a hung engine (it answered
    ``generation_timeout``, "produced no audio", and abandoned the engine's worker thread)."""
    async with running_server(piper_slot(), generation_timeout=2.0, text_timeout=10.0) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(opened("pause", stream=True))
            await ws.send(piece("pause", "The first sentence is here.", flush=True))
            await first_audio(ws)
            await asyncio.sleep(3.5)  # longer than --generation-timeout (2 s: a slow sentence on a loaded machine)
            await ws.send(piece("pause", " And the second one follows.", flush=True))
            await ws.send(ended("pause"))
            done, _, _ = await collect(ws, "pause")
    assert done["status"] == "success", done


async def test_a_wyoming_stream_pausing_between_sentences_within_the_text_timeout_is_not_abandoned():
    """The same over Wyoming (synthesize-start/chunk/stop): a pause shorter than --text-timeout between sentences
    ends in audio and audio-stop, with no ``generation_timeout`` error event."""
    port = free_port()
    async with running_server(piper_slot(), wyoming_uri=f"tcp://127.0.0.1:{port}", generation_timeout=2.0,
                              text_timeout=10.0):
        async with AsyncTcpClient("127.0.0.1", port) as c:
            await c.write_event(SynthesizeStart(voice=SynthesizeVoice(name="piper")).event())
            await c.write_event(SynthesizeChunk(text="The first sentence is here. And the second").event())
            events = [await asyncio.wait_for(c.read_event(), 30)]
            while events[-1].type != "audio-chunk":
                events.append(await asyncio.wait_for(c.read_event(), 30))
            await asyncio.sleep(3.5)  # longer than --generation-timeout (2 s: a slow sentence on a loaded machine)
            await c.write_event(SynthesizeChunk(text=" one follows. ").event())
            await c.write_event(SynthesizeStop().event())
            while events[-1].type != "synthesize-stopped":
                events.append(await asyncio.wait_for(c.read_event(), 30))
    errors = [Error.from_event(event).code for event in events if event.type == "error"]
    assert errors == [] and [e.type for e in events][-2:] == ["audio-stop", "synthesize-stopped"], errors


async def test_a_text_stream_cancelled_or_barged_in_at_any_moment_ends_once_and_the_connection_serves_on(
        tiny_model_dir):
    """Cancel (with and without ``played_ms``) before the first sentence, while it is spoken, after text_end, and
    after its success: every stream ends exactly once (cancelled or success, no error), a piece after the end is
    told it has ended, and a normal request afterwards is answered."""
    async with running_server(csm_slot(tiny_model_dir), text_timeout=30) as server:
        async with websockets.connect(url(server)) as ws:
            ends = {}
            for played in (None, 40):
                before, spoken, late = (f"{name}{played}" for name in ("before", "spoken", "late"))
                await ws.send(opened(before, text="Not yet a sent"))
                await ws.send(json.dumps({"type": "cancel", "request_id": before, "played_ms": played}))
                ends[before] = (await collect(ws, before, timeout=30))[0]["status"]
                await ws.send(opened(spoken, stream=True, max_audio_length_ms=4000))
                await ws.send(piece(spoken, "A first sentence to say.", flush=True))
                await first_audio(ws)
                await ws.send(json.dumps({"type": "cancel", "request_id": spoken, "played_ms": played}))
                ends[spoken] = (await collect(ws, spoken, timeout=30))[0]["status"]
                await ws.send(opened(late, stream=True, max_audio_length_ms=2000))
                await ws.send(piece(late, "A first sentence to say. And one more."))
                await ws.send(ended(late))
                await ws.send(json.dumps({"type": "cancel", "request_id": late, "played_ms": played}))
                ends[late] = (await collect(ws, late, timeout=30))[0]["status"]
            await ws.send(piece("lateNone", " more"))
            while (told := await recv_json(ws))["status"] != "error":  # a cut's ``truncated`` first
                assert told["status"] == "truncated", told
            await ws.send(json.dumps({"text": "Still here.", "request_id": "after", "max_audio_length_ms": 160}))
            after, _, _ = await collect(ws, "after", timeout=30)
    assert set(ends.values()) <= {"cancelled", "success"} and ends["beforeNone"] == ends["before40"] == "cancelled"
    assert told["code"] == "invalid_request" and "'lateNone' has ended" in told["message"]
    assert "request_id" not in told  # not that request's end: its reply ended before
    assert after["status"] == "success"


async def test_a_connection_closed_mid_stream_frees_the_engine_and_leaves_no_watch_behind(tiny_model_dir):
    """One engine worker (batch 1), --text-timeout 60: a stream whose first sentence is being spoken, its
    connection closed.  Another client is answered long before the stream's text timeout, and no text-stream watch
    task is left running."""
    async with running_server(csm_slot(tiny_model_dir), text_timeout=60) as server:
        async with websockets.connect(url(server)) as gone:
            await gone.send(opened("held", stream=True, max_audio_length_ms=4000))
            await gone.send(piece("held", "The first sentence here.", flush=True))
            await first_audio(gone)
        async with websockets.connect(url(server)) as other:
            await other.send(json.dumps({"text": "Next one.", "max_audio_length_ms": 160}))
            served, _, _ = await collect(other, timeout=30)  # well inside the 60 s the stream could have held it
        await asyncio.sleep(0.2)
        watches = [task for task in asyncio.all_tasks() if task.get_name().startswith("text-")]
    assert served["status"] == "success"
    assert watches == []


async def test_a_text_stream_open_when_the_server_shuts_down_is_answered_before_the_connection_closes():
    """A graceful shutdown refuses what is queued with ``shutting_down``; an accepted text stream still waiting for
    its first sentence must end so too (or ``cancelled``), not vanish with the 1001 close (it got no reply at all,
    and held the drain until its end)."""
    async with running_server(piper_slot(), text_timeout=30) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(opened("open", text="Half a sent"))
            await ws.send(json.dumps({"type": "reset"}))
            assert (await recv_json(ws))["status"] == "reset"  # the stream is open on the server
            shutdown = asyncio.create_task(server.shutdown(0.2))
            replies = []
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    frame = await asyncio.wait_for(ws.recv(), 30)
                    replies.append(json.loads(frame) if isinstance(frame, str) else frame)
            await shutdown
    ends = [reply for reply in replies if isinstance(reply, dict) and reply.get("request_id") == "open"]
    assert [end["status"] for end in ends] in (["error"], ["cancelled"]), replies
    assert ends[0].get("code", "shutting_down") == "shutting_down"


async def test_a_text_stream_for_a_language_no_engine_speaks_is_refused_when_it_opens():
    """``language`` no engine speaks (or an ``engine`` this server does not run) is known when the stream opens:
    it is refused then, ``unsupported_language``, as a whole text is, not left open for the client to write its
    whole answer into (it ended ``text_timeout`` when the writer paused, hiding the real reason)."""
    async with running_server(piper_slot(), text_timeout=1.0) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"text": "Hello there.", "request_id": "whole", "language": "xx"}))
            whole = await recv_json(ws)
            await ws.send(opened("streamed", language="xx"))
            streamed, _, _ = await collect(ws, "streamed", timeout=30)
    assert whole["code"] == "unsupported_language"
    assert streamed["status"] == "error" and streamed["code"] == "unsupported_language", streamed


async def test_a_wyoming_stream_open_when_the_server_shuts_down_gets_an_error_event_before_the_connection_ends():
    """The same over Wyoming: a stream still waiting for its first sentence learns of the shutdown with an error
    event (``shutting_down``, as a cancelled generation is told), not a silent end of the connection."""
    port = free_port()
    async with running_server(piper_slot(), wyoming_uri=f"tcp://127.0.0.1:{port}", text_timeout=30) as server:
        async with AsyncTcpClient("127.0.0.1", port) as c:
            await c.write_event(SynthesizeStart(voice=SynthesizeVoice(name="piper")).event())
            await c.write_event(SynthesizeChunk(text="Half a sent").event())
            await c.write_event(Ping().event())
            assert (await asyncio.wait_for(c.read_event(), 30)).type == "pong"  # the stream is open on the server
            shutdown = asyncio.create_task(server.shutdown(0.2))
            events = []
            with contextlib.suppress(ConnectionError):
                while (event := await asyncio.wait_for(c.read_event(), 30)) is not None:
                    events.append(event)
            await shutdown
    assert [Error.from_event(event).code for event in events if event.type == "error"] == ["shutting_down"], events


async def test_a_rejected_piece_ends_its_stream_with_one_terminal_error_the_wire_client_reports():
    """A piece the server refuses (half a surrogate pair) ends its open stream with that error: the stream's one
    terminal reply, so a client (here ``integrations.wire``) never mistakes a piece's rejection for the end, or
    the end for a piece's rejection.  The pieces after it are told the stream has ended, without its id; the
    connection serves on."""
    from tts_server.integrations.wire import CSMClient

    async with running_server(piper_slot()) as server:
        client = CSMClient(url(server))
        try:
            reply = await client.speak("agent")
            await client.text("agent", "Good morning \ud83d")
            await client.text("agent", " to you all, my friends.")
            await client.end("agent")
            items = [item async for item in reply]
            again = await client.speak("again", "Fine, thank you.")
            await client.end("again")
            after = [item async for item in again]
        finally:
            await client.close()
    replies = [item for item in items if isinstance(item, dict)]
    assert [(r["status"], r.get("code")) for r in replies] == [("error", "invalid_request")], replies
    assert "'delta'" in replies[0]["message"]
    assert after[-1]["status"] == "success" and any(isinstance(item, bytes) for item in after)


async def test_a_stream_of_exactly_max_text_chars_in_pieces_is_spoken_and_one_more_is_text_too_long():
    """--max-text-chars 40: 40 characters in 7-character pieces (the opening text counted too) are spoken; 41 end the
    stream ``text_too_long`` at the piece that crosses the limit."""
    text = "Ten chars. Ten chars. Ten chars. Ten ch."
    async with running_server(piper_slot(), max_text_chars=40) as server:
        async with websockets.connect(url(server)) as ws:
            ends = {}
            for name, rest in (("exact", text[5:]), ("over", text[5:] + "x")):
                await ws.send(opened(name, text=text[:5], stream=True))
                for at in range(0, len(rest), 7):
                    await ws.send(piece(name, rest[at:at + 7]))
                if name == "exact":
                    await ws.send(ended(name))
                ends[name] = await collect(ws, name)  # "over" ends at its last piece, without text_end
    assert ends["exact"][0]["status"] == "success" and ends["exact"][1]
    assert ends["over"][0]["code"] == "text_too_long"
