"""No client's backlog on the shared speech-recognition thread delays another client's turn, and the work of a
request or a client that has gone is dropped (tiny CSM, Whisper base as --stt-model, real WebSocket clients).

The transcriber records the order of its calls (alignments of CSM's sentences, transcriptions of turns): the
tests assert which ran before which, never how long anything took."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import numpy as np
import websockets

from audio_fixtures import audio_bytes, pcm16, spoken
from conftest import ahttp_get, csm_slot, read_until, recv_json, running_server, url
from test_sessions import word_error_rate

SENTENCES = 8  # alignments queued by one reply (while the first holds the thread, the rest wait: a backlog)
TEXT = " ".join(f"Number {i} is up." for i in range(SENTENCES))
SAID = "Could you tell me a short story about the sea?"


def recording_transcriber(whisper_dir):
    """Whisper base that logs each call ("align" / "transcribe", in the order they run); while ``gate`` is clear a
    call waits (holding the thread, so the work behind it stays queued)."""
    from tts_server.engines.stt import Transcriber

    class Recording(Transcriber):
        def __init__(self) -> None:
            super().__init__(str(whisper_dir), "cpu", local_only=True)
            self.calls: list[tuple[str, float]] = []
            self.gate = threading.Event()
            self.gate.set()

        def align(self, audio, rate, text):
            self.calls.append(("align", len(audio) / rate))
            self.gate.wait(60)
            return super().align(audio, rate, text)

        def recognize(self, audio, rate=24000, language=None):
            self.calls.append(("transcribe", len(audio) / rate))
            self.gate.wait(60)
            return super().recognize(audio, rate, language)

    return Recording()


def aligned(calls) -> int:
    return sum(kind == "align" for kind, _ in calls)


async def backlog(ws, request_id: str) -> None:
    """A CSM reply with word times for many sentences; returns once every sentence is generated (each one's
    alignment has been asked for by then)."""
    await ws.send(json.dumps({"text": TEXT, "request_id": request_id, "seed": 1, "stream": True, "format": "pcm",
                              "timestamps": True, "progress": True, "max_audio_length_ms": 60000}))
    await read_until(ws, lambda r: r.get("status") == "progress" and r["sentence"] == SENTENCES
                     or r.get("status") in ("success", "error", "cancelled"))


async def metric(port: int, name: str, thread: str = "stt") -> float:
    _, text = await ahttp_get(port, "/metrics")
    found = re.search(rf'^{name}{{thread="{thread}"}} (\S+)$', text, re.M)
    assert found, f"{name} for {thread} is not in /metrics"
    return float(found.group(1))


async def queued_becomes(port: int, count: int) -> float:
    """Polls the shared thread's queue gauge until it shows ``count`` (bounded); the last value seen."""
    for _ in range(400):
        if (seen := await metric(port, "tts_shared_thread_queued")) == count:
            break
        await asyncio.sleep(0.05)
    return seen


async def test_a_turn_is_transcribed_before_another_clients_backlog_of_alignments_which_a_cancel_drops(
        tiny_model_dir, whisper_dir):
    stt = recording_transcriber(whisper_dir)
    async with running_server(csm_slot(tiny_model_dir), stt=stt) as server:
        await server.service.speech.loaded.wait()
        async with websockets.connect(url(server)) as a, websockets.connect(url(server)) as b:
            stt.gate.clear()  # A's first alignment holds the thread: the rest of its backlog waits behind it
            await backlog(a, "long")
            # while A's reply waits for its words, CSM's one worker is free: B's synthesis is answered meanwhile
            await b.send(json.dumps({"text": "Hello there.", "seed": 2, "max_audio_length_ms": 400}))
            spoke, _, _ = await read_until(b, lambda r: r.get("status") in ("success", "error", "cancelled"))
            started = len(stt.calls)
            await b.send(json.dumps({"type": "turn", "speaker": 1}))
            await b.send(audio_bytes(spoken(SAID, 24000)))
            waiting = await queued_becomes(server.port, SENTENCES)  # A's backlog (all but the first) and B's turn
            stt.gate.set()
            saved = await recv_json(b)
            await a.send(json.dumps({"type": "cancel", "request_id": "long"}))
            ended, _, _ = await read_until(a, lambda r: r.get("status") in ("success", "error", "cancelled"))
            queued = await metric(server.port, "tts_shared_thread_queued")
            dropped = await metric(server.port, "tts_shared_thread_dropped_total")
    assert spoke["status"] == "success" and started == 1  # (only A's first alignment had started, held)
    assert waiting == SENTENCES
    assert saved["status"] == "turn_saved" and word_error_rate(SAID, saved["text"]) <= 0.2
    turn_at = [kind for kind, _ in stt.calls].index("transcribe")
    # B's turn ran right after the alignment running when it came, not after A's backlog
    assert aligned(stt.calls[:turn_at]) == 1, stt.calls
    assert ended == {"status": "cancelled", "request_id": "long"}
    # A's waiting alignments were dropped, not run: at most the one running at the cancel, and one more, ran
    assert queued == 0 and aligned(stt.calls) + dropped == SENTENCES and dropped >= SENTENCES - 4


async def test_a_client_that_leaves_has_its_queued_alignments_dropped(tiny_model_dir, whisper_dir):
    stt = recording_transcriber(whisper_dir)
    async with running_server(csm_slot(tiny_model_dir), stt=stt) as server:
        await server.service.speech.loaded.wait()
        stt.gate.clear()
        async with websockets.connect(url(server)) as a:
            await backlog(a, "long")
            waiting = await metric(server.port, "tts_shared_thread_queued")
        left = await queued_becomes(server.port, 0)  # the close reaches the server: its queue empties
        stt.gate.set()
        async with websockets.connect(url(server)) as b:  # the next client's turn is served at once
            await b.send(json.dumps({"type": "turn", "speaker": 1}))
            await b.send(audio_bytes(spoken(SAID, 24000)))
            saved = await recv_json(b)
        dropped = await metric(server.port, "tts_shared_thread_dropped_total")
    assert waiting == SENTENCES - 1 and left == 0 and dropped == SENTENCES - 1
    assert saved["status"] == "turn_saved"
    assert [kind for kind, _ in stt.calls] == ["align", "transcribe"]  # none of the dropped ones ran later


async def test_an_utterance_is_transcribed_piece_by_piece_at_its_pauses_one_piece_waiting_at_a_time(tiny_model_dir,
                                                                                                     whisper_dir):
    """Speech with many short gaps (each a pause, then a resume): the piece since the previous pause is transcribed
    at each pause, in order, with at most one of them waiting for the thread; every piece is heard once, and the
    turn's transcript (the pieces joined) is right."""
    stt = recording_transcriber(whisper_dir)
    rate, phrase = 16000, spoken("Yes, and then", 16000)
    gap = np.zeros(int(0.35 * rate), np.float32)  # longer than the pause (200 ms), shorter than the end (600 ms)
    pieces = [np.zeros(int(0.3 * rate), np.float32)]
    for _ in range(6):
        pieces += [phrase, gap]
    pieces += [spoken(SAID, rate), np.zeros(int(1.0 * rate), np.float32)]
    async with running_server(csm_slot(tiny_model_dir), stt=stt) as server:
        await server.service.speech.loaded.wait()
        stt.gate.clear()  # transcriptions wait: every one started by a pause stays queued or running
        async with websockets.connect(url(server), ping_interval=None) as ws:  # its reader waits for the gate
            await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": rate, "vad": True}))
            data = pcm16(np.concatenate(pieces))
            for offset in range(0, len(data), 1280):
                await ws.send(data[offset:offset + 1280])
            ended, _, others = await read_until(ws, lambda r: r.get("status") in ("speech_end", "error"))
            waiting = server.service.speech.thread.pending
            stt.gate.set()
            saved, _, _ = await read_until(ws, lambda r: r.get("status") in ("turn_saved", "error"))
    assert ended["status"] == "speech_end" and [r["status"] for r, _ in others] == ["speech_start"]
    assert waiting <= 1  # the pieces wait for one another, not on the thread
    transcribed = [seconds for kind, seconds in stt.calls if kind == "transcribe"]
    assert len(transcribed) == 7, stt.calls  # six pieces up to a pause each, and the rest
    said = len(np.concatenate(pieces[1:-1])) / rate  # the speech and its gaps, without the silence around them
    assert said <= sum(transcribed) <= said + 0.3 + 0.6  # all of it once, with the pre-roll and the silence heard
    assert saved["status"] == "turn_saved" and word_error_rate(" ".join(["Yes, and then"] * 6 + [SAID]),
                                                               saved["text"]) <= 0.25


async def test_a_closed_connections_buffered_audio_frames_are_dropped_not_encoded(tiny_model_dir):
    """A client streams 50 frames of a turn while the turn-encoding thread is held, then its connection drops: at most
    the frame its reader was waiting on is encoded, never the 49 it had buffered (the server used to work through
    all of them after the client had gone)."""
    from audio_fixtures import speechlike

    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": 16000}))
            await ws.send(json.dumps({"type": "cancel", "request_id": "opened"}))  # a marker: the turn is open
            await recv_json(ws)
            gate = threading.Event()
            held = asyncio.get_running_loop().run_in_executor(server.service.turns.thread, gate.wait, 60)
            before = server.service.turns.thread.completed
            frame = pcm16(speechlike(0.1, rate=16000))
            for _ in range(50):
                await ws.send(frame)
            while server.service.turns.thread.pending == 0:  # its reader waits on the first frame's encoding
                await asyncio.sleep(0.02)
            ws.transport.abort()  # the connection drops (no close handshake)
        await asyncio.sleep(0.2)
        gate.set()
        await held
        for _ in range(400):  # its reader ends (polled, with a bound)
            if not server.connections:
                break
            await asyncio.sleep(0.05)
        gone = not server.connections
        await asyncio.sleep(0.2)  # (time for anything of it still queued to run: nothing should be)
        encoded = server.service.turns.thread.completed - before
        async with websockets.connect(url(server)) as ws:  # the thread serves the next client
            await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": 16000}))
            await ws.send(pcm16(speechlike(1.0, rate=16000)))
            await ws.send(json.dumps({"type": "turn_end", "text": "Next."}))
            saved = await recv_json(ws)
    assert gone
    assert encoded <= 2  # the held item, and at most the frame its reader was waiting on: not 50 frames
    assert saved["status"] == "turn_saved"


async def test_two_users_transcribing_at_once_take_turns_not_one_after_the_others_whole_utterance(tiny_model_dir,
                                                                                                 whisper_dir):
    """A speaks hands-free with six pauses (six pieces to transcribe); while A's first piece holds the recogniser,
    B sends a whole turn. B's is transcribed next, not after the rest of A's utterance: A's pieces wait for one
    another, so A has one of them in line at a time."""
    stt = recording_transcriber(whisper_dir)
    rate, phrase = 16000, spoken("Yes, and then", 16000)
    gap = np.zeros(int(0.35 * rate), np.float32)
    said = np.concatenate([np.zeros(int(0.3 * rate), np.float32), *[part for _ in range(6) for part in (phrase, gap)],
                           np.zeros(int(1.0 * rate), np.float32)])
    async with running_server(csm_slot(tiny_model_dir), stt=stt, vad_silence_ms=600) as server:
        await server.service.speech.loaded.wait()
        stt.gate.clear()
        async with websockets.connect(url(server), ping_interval=None) as a, \
                websockets.connect(url(server), ping_interval=None) as b:
            await a.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": rate, "vad": True}))
            data = pcm16(said)
            for offset in range(0, len(data), 1280):
                await a.send(data[offset:offset + 1280])
            await read_until(a, lambda r: r.get("status") in ("speech_end", "error"))
            await b.send(json.dumps({"type": "turn", "speaker": 1}))
            await b.send(audio_bytes(spoken(SAID, 24000)))
            await queued_becomes(server.port, 2)  # A's next piece and B's turn wait behind A's first piece
            stt.gate.set()
            saved_b = await recv_json(b)
            saved_a, _, _ = await read_until(a, lambda r: r.get("status") in ("turn_saved", "error"))
    whole = len(spoken(SAID, 24000)) / 24000
    durations = [seconds for kind, seconds in stt.calls if kind == "transcribe"]
    b_at = next(i for i, seconds in enumerate(durations) if abs(seconds - whole) < 0.01)
    assert b_at <= 2, durations  # after A's running piece (and at most the one A had in line), not after six
    assert len(durations) == 7 and saved_a["status"] == saved_b["status"] == "turn_saved"
