"""Barge-in on a reply still being spoken: ``cancel`` with ``played_ms`` keeps what was heard of the sentence being
spoken too (cut at its last whole 80 ms frame, its text cut at a word boundary), in the first sentence as in a later
one, in the connection's history and its session (a real server with the tiny CSM)."""

from __future__ import annotations

import json

import pytest
import pytest_asyncio
import websockets

from conftest import ahttp_get, collect, csm_slot, read_until, recv_json, reply_json, running_server, url

pytestmark = pytest.mark.asyncio(loop_scope="module")
FIRST = "The first sentence goes on a while."  # the tiny CSM speaks each for its whole frame budget (3.8 s)
SECOND = "The second one is as long as that."
THIRD = "A third one follows."


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir)) as server:
        yield server


async def spoken_until(ws, enough) -> tuple[list[dict], int]:
    """Read a streamed reply until ``enough(replies, audio bytes)``; the JSON replies so far and the audio bytes."""
    replies, received = [], 0
    while not enough(replies, received):
        frame = await ws.recv()
        if isinstance(frame, bytes):
            received += len(frame)
        else:
            replies.append(reply_json(frame))
            assert replies[-1]["status"] not in ("success", "error", "cancelled"), replies
    return replies, received


async def cut_off(server, enough, played_ms) -> tuple[dict, list[dict], list[dict]]:
    """A session-bound reply of three long sentences, cancelled with ``played_ms`` once ``enough``: (the
    ``truncated`` reply, the progress seen before the cancel, the session's stored turns)."""
    async with websockets.connect(url(server)) as ws:
        await ws.send(json.dumps({"type": "session"}))
        session = (await recv_json(ws))["session"]
        await ws.send(json.dumps({"text": f"{FIRST} {SECOND} {THIRD}", "seed": 3, "stream": True, "format": "pcm",
                                  "progress": True, "request_id": "reply"}))
        replies, _ = await spoken_until(ws, enough)
        await ws.send(json.dumps({"type": "cancel", "request_id": "reply", "played_ms": played_ms(replies)}))
        ended, _, _ = await collect(ws, "reply")
        cut, _, _ = await read_until(ws, lambda r: r.get("status") == "truncated")
    assert ended["status"] == "cancelled"
    _, listed = await ahttp_get(server.port, f"/v1/sessions/{session}")
    return cut, [r for r in replies if r["status"] == "progress"], json.loads(listed)["turns"]


def a_shorter_prefix(kept: str, sentence: str) -> bool:
    words, said = sentence.split(), kept.split()
    return 1 <= len(said) < len(words) and said == words[:len(said)]


async def test_an_interruption_in_the_first_sentence_keeps_its_heard_frames_and_words(server):
    # 640 ms of the reply received (16 frames), of which the listener heard 400 ms: five whole frames
    cut, progress, turns = await cut_off(server, lambda replies, received: received >= 0.64 * 24000 * 2,
                                         lambda replies: 400)
    assert progress == []  # the first sentence was still being spoken
    assert cut["kept_s"] == 0.4
    assert len(turns) == 1 and turns[0]["duration_s"] == 0.4 and turns[0]["speaker"] == 0
    assert a_shorter_prefix(turns[0]["text"], FIRST), turns


async def test_an_interruption_in_a_middle_sentence_keeps_the_sentences_before_and_its_heard_part(server):
    def enough(replies, received):  # the first sentence is done and 0.4 s of the second has arrived
        done = [r for r in replies if r["status"] == "progress"]
        return bool(done) and received >= (done[0]["audio_s"] + 0.4) * 24000 * 2

    cut, progress, turns = await cut_off(server, enough, lambda replies: 1000 * progress_s(replies) + 300)
    first_s = progress[0]["audio_s"]
    assert [p["sentence"] for p in progress] == [1]
    assert cut["kept_s"] == pytest.approx(first_s + 0.24, abs=0.002)  # 300 ms into the second: three frames
    assert [t["text"] for t in turns][:1] == [FIRST] and len(turns) == 2
    assert turns[0]["duration_s"] == pytest.approx(first_s, abs=0.002) and turns[1]["duration_s"] == 0.24
    assert a_shorter_prefix(turns[1]["text"], SECOND), turns


def progress_s(replies: list[dict]) -> float:
    return next(r["audio_s"] for r in replies if r["status"] == "progress")
