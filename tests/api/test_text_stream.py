"""Text that streams in (issue 30, item 1): a reply whose text arrives in pieces, as an LLM writes it, over the real
WebSocket with a real (tiny) CSM.  In any pieces it is the whole text's seeded audio; its errors are clear; a writer
that stalls is bounded and holds no engine worker."""

from __future__ import annotations

import asyncio
import json
import random

import websockets
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from conftest import collect, csm_slot, recv_json, reply_json, running_server, server_in_thread, url

TEXT = 'The price rose to 3.5 percent today. He said "fine." Then we left at 10:30, tired. Yes.'
SEEDED = {"seed": 5, "context": False, "stream": True, "max_audio_length_ms": 2400}


def cuttings(text: str) -> list[list[str]]:
    """The text in pieces of 1 to 100 characters, cut anywhere (seeded), and cut mid-number and between a period
    and its closing quote."""
    rng = random.Random(30)
    cut = []
    for _ in range(3):
        pieces, at = [], 0
        while at < len(text):
            size = rng.choice([1, 2, 3, 7, 20, 100])
            pieces.append(text[at:at + size])
            at += size
        cut.append(pieces)
    number, quote = text.index("3.5") + 2, text.index('."') + 1
    cut.append([text[:number], text[number:quote], text[quote:]])
    return cut


async def streamed(ws, request_id: str, pieces: list[str], **options) -> tuple[dict, bytes, list[dict]]:
    await ws.send(json.dumps({"type": "synthesize", "request_id": request_id, "text_stream": True, **options}))
    for piece in pieces:
        await ws.send(json.dumps({"type": "text", "request_id": request_id, "delta": piece}))
    await ws.send(json.dumps({"type": "text_end", "request_id": request_id}))
    return await collect(ws, request_id)


async def test_a_text_streamed_in_any_pieces_gives_the_whole_texts_seeded_audio(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"text": TEXT, "request_id": "whole", **SEEDED}))
            whole, whole_audio, _ = await collect(ws, "whole")
            runs = [await streamed(ws, f"s{i}", pieces, **SEEDED) for i, pieces in enumerate(cuttings(TEXT))]
            other_seed = await streamed(ws, "other", [TEXT], **{**SEEDED, "seed": 6})
    assert whole["status"] == "success" and len(whole_audio) > 0
    for done, audio, _ in runs:
        assert done["status"] == "success" and audio == whole_audio, done
    assert other_seed[1] != whole_audio  # the comparison can fail: the seed decides the audio


async def test_a_text_stream_speaks_its_first_sentence_before_the_text_ends(tiny_model_dir):
    """At a flush (or once the next sentence has begun) the first sentence is spoken: its audio arrives while the
    stream is still open, and the rest follows in the same reply."""
    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"type": "synthesize", "request_id": "f", "text_stream": True, "stream": True,
                                      "max_audio_length_ms": 4000, "progress": True}))
            await ws.send(json.dumps({"type": "text", "request_id": "f", "delta": "Good morning to you.",
                                      "flush": True}))
            while not isinstance(first := await asyncio.wait_for(ws.recv(), 60), bytes):  # no text_end yet
                assert json.loads(first)["status"] in ("start", "progress"), first
            await ws.send(json.dumps({"type": "text", "request_id": "f", "delta": " And a good day to all."}))
            await ws.send(json.dumps({"type": "text_end", "request_id": "f"}))
            done, audio, others = await collect(ws, "f")
    assert first and done["status"] == "success" and audio
    assert [r["sentence"] for r in others if r["status"] == "progress"][-1:] == [2]


async def test_pieces_for_an_unknown_or_ended_stream_and_a_stream_over_the_limit_get_clear_errors(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir), max_text_chars=40) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"type": "text", "request_id": "nobody", "delta": "Hi."}))
            unknown = await recv_json(ws)
            await ws.send(json.dumps({"type": "text_end", "request_id": "nobody"}))
            unknown_end = await recv_json(ws)
            await ws.send(json.dumps({"type": "synthesize", "request_id": "e", "text_stream": True,
                                      "text": "Short one.", "max_audio_length_ms": 160}))
            await ws.send(json.dumps({"type": "text_end", "request_id": "e"}))
            await ws.send(json.dumps({"type": "text", "request_id": "e", "delta": " More."}))
            late = await recv_json(ws)
            ended, _, _ = await collect(ws, "e")
            await ws.send(json.dumps({"type": "text", "request_id": "e", "delta": " Later still."}))
            after = await recv_json(ws)
            await ws.send(json.dumps({"type": "synthesize", "request_id": "long", "text_stream": True,
                                      "max_audio_length_ms": 160}))
            for _ in range(5):
                await ws.send(json.dumps({"type": "text", "request_id": "long", "delta": "Ten chars."}))
            too_long, _, _ = await collect(ws, "long")
            await ws.send(json.dumps({"type": "synthesize", "request_id": "blank", "text_stream": True}))
            await ws.send(json.dumps({"type": "text", "request_id": "blank", "delta": " — ?! "}))
            await ws.send(json.dumps({"type": "text_end", "request_id": "blank"}))
            blank, _, _ = await collect(ws, "blank")
            await ws.send(json.dumps({"text": "Still here.", "max_audio_length_ms": 160}))
            alive, _, _ = await collect(ws)
    assert unknown["code"] == unknown_end["code"] == "unknown_request" and "'nobody'" in unknown["message"]
    assert late["code"] == "invalid_request" and "'e' has ended" in late["message"]
    assert "request_id" not in late and "request_id" not in unknown  # neither ends a request's reply
    assert ended["status"] == "success" and after["code"] == "invalid_request" and "has ended" in after["message"]
    assert too_long["code"] == "text_too_long" and too_long["request_id"] == "long"
    assert blank["code"] == "invalid_request" and "nothing to speak" in blank["message"]
    assert alive["status"] == "success"


async def test_a_stalled_text_stream_times_out_and_holds_no_engine_worker_meanwhile(tiny_model_dir):
    """One engine worker (batch 1).  A stream that wrote half a sentence and stalls leaves the worker free: another
    client is answered meanwhile; then the stream ends ``text_timeout``.  A stream whose first sentence is spoken
    and then stalls also ends so."""
    async with running_server(csm_slot(tiny_model_dir), text_timeout=1.0) as server:
        async with websockets.connect(url(server)) as writer, websockets.connect(url(server)) as other:
            await writer.send(json.dumps({"type": "synthesize", "request_id": "stall", "text_stream": True,
                                          "text": "Half a sent", "max_audio_length_ms": 160}))
            await other.send(json.dumps({"text": "Meanwhile.", "max_audio_length_ms": 160}))
            meanwhile, _, _ = await collect(other)
            stalled, _, _ = await collect(writer, "stall")
            await writer.send(json.dumps({"type": "synthesize", "request_id": "spoken", "text_stream": True,
                                          "stream": True, "max_audio_length_ms": 160}))
            await writer.send(json.dumps({"type": "text", "request_id": "spoken", "delta": "One sentence here.",
                                          "flush": True}))
            spoken, audio, _ = await collect(writer, "spoken")
    assert meanwhile["status"] == "success"
    assert stalled["code"] == "text_timeout" and stalled["request_id"] == "stall"
    assert spoken["code"] == "text_timeout" and audio  # its first sentence was spoken, then it timed out


async def test_a_cancelled_text_stream_ends_cancelled_and_a_late_piece_is_told_it_has_ended(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"type": "synthesize", "request_id": "c", "text_stream": True,
                                      "text": "Not yet a sentence"}))
            await ws.send(json.dumps({"type": "cancel", "request_id": "c"}))
            await ws.send(json.dumps({"type": "text", "request_id": "c", "delta": " in flight."}))
            late = await recv_json(ws)  # a rejection is sent at once, before the queued reply
            cancelled, _, _ = await collect(ws, "c")
            await ws.send(json.dumps({"type": "text", "request_id": "c", "delta": " later."}))
            later = await recv_json(ws)
    assert cancelled["status"] == "cancelled"
    assert late["code"] == later["code"] == "invalid_request" and "has ended" in later["message"]


# -- hostile pieces: fuzzed on one open stream, through the sync client on a server in its own thread --------------
STREAM_FUZZ_SEED = 20261205
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=8)
pieces = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "text", "text", "text_end", "cancel"]) | json_values},
    optional={"request_id": st.sampled_from(["fz", "fz", "fz", "other", ""]) | json_values,
              "delta": st.text(max_size=60) | st.sampled_from(["3.", "5 ", '."', " ", "\ud800x", "x" * 300])
              | json_values,
              "flush": st.booleans() | json_values})


def test_hostile_pieces_on_an_open_text_stream_each_get_a_clear_answer_and_the_reply_ends_once(tiny_model_dir):
    """Pieces of any shape (wrong types, unknown ids, lone surrogates, over the limit, after the end, cancels in
    between) on an open stream: nothing is an internal error, every error has a stable code, the stream's reply ends
    with exactly one terminal reply (a bad piece ends it), and the connection serves a normal request afterwards."""
    from websockets.sync.client import connect

    with server_in_thread(csm_slot(tiny_model_dir, max_batch=2), max_text_chars=200, rate_limit=10**6,
                          text_timeout=2.0) as server, \
            connect(f"ws://127.0.0.1:{server.port}", max_size=None) as ws:
        ends = []

        @seed(STREAM_FUZZ_SEED)
        @settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
        @given(st.lists(pieces, max_size=12))
        def run(frames):
            ws.send(json.dumps({"type": "synthesize", "request_id": "fz", "text_stream": True, "stream": True,
                                "max_audio_length_ms": 160, "text": "Start."}))
            for frame in frames:
                ws.send(json.dumps(frame))
            ws.send(json.dumps({"type": "text_end", "request_id": "fz"}))
            ws.send(json.dumps({"type": "reset"}))
            terminal, reset = [], False
            while not (terminal and reset):
                reply = ws.recv(timeout=60)
                if isinstance(reply, bytes):
                    continue
                data = reply_json(reply)
                assert data.get("code") not in ("internal_error", "generation_failed"), data
                reset = reset or data["status"] == "reset"
                if data.get("request_id") == "fz" and data["status"] in ("success", "cancelled", "error"):
                    terminal.append(data)  # its end (a bad piece ends it too), or a later message's error
            ends.append(terminal[0]["status"] if sum(t["status"] != "error" for t in terminal) <= 1 else terminal)

        run()
        ws.send(json.dumps({"text": "After the storm.", "max_audio_length_ms": 160}))
        while isinstance(reply := ws.recv(timeout=60), bytes) or reply_json(reply)["status"] not in (
                "success", "error", "cancelled"):
            pass
    assert all(isinstance(end, str) for end in ends), [e for e in ends if not isinstance(e, str)]  # ended once
    assert {"success", "cancelled"} <= set(ends)  # both kinds of end were reached
    assert json.loads(reply)["status"] == "success"


async def test_a_flood_of_empty_and_one_character_pieces_is_spoken_as_the_whole_text(tiny_model_dir):
    """Ten thousand empty pieces, then the text one character at a time: the same seeded audio as the whole."""
    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"text": TEXT, "request_id": "whole", **SEEDED}))
            _, whole_audio, _ = await collect(ws, "whole")
            done, audio, _ = await streamed(ws, "flood", [""] * 10_000 + list(TEXT), **SEEDED)
    assert done["status"] == "success" and audio == whole_audio
