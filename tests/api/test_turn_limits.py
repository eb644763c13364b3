"""Limits on the other side's streamed audio, through the real server: a connection sends it at most a little
faster than real time (``rate_limited`` beyond its burst, before any work is spent on it), a turn or utterance left
open too long is dropped (``client_too_slow``), and listening changes nothing about how the turn-encoding thread
computes.  After each refusal the connection serves on."""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest
import websockets

from audio_fixtures import audio_bytes, pcm16, speechlike, spoken
from conftest import csm_slot, read_until, recv_json, running_server, url
from test_sessions import turn


async def marker(ws, name: str = "marker") -> tuple[dict, list[dict]]:
    """Send a cancel of an unknown id (answered after every frame before it): (its answer, the replies before)."""
    await ws.send(json.dumps({"type": "cancel", "request_id": name}))
    answer, _, others = await read_until(ws, lambda r: r.get("request_id") == name, 60)
    return answer, [other for other, _ in others]


async def test_audio_faster_than_real_time_is_refused_with_rate_limited_and_the_turn_dropped(tiny_model_dir):
    second = pcm16(np.zeros(16000, np.float32))  # one second at 16 kHz
    # a 3 s burst and almost no refill, so however long the server takes over each frame, the fourth is refused
    async with running_server(csm_slot(tiny_model_dir), audio_burst_seconds=3, audio_speed=0.01) as server:
        for vad in (False, True):
            async with websockets.connect(url(server)) as ws:
                await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": 16000, "vad": vad}))
                for _ in range(10):  # ten seconds at once
                    await ws.send(second)
                _, replies = await marker(ws)
                await ws.send(json.dumps({"type": "turn_end", "text": "Too fast."}))
                after = await recv_json(ws)
                saved = await turn(ws, audio_bytes(speechlike(1.0)), "Still here.")
            codes = [reply["code"] for reply in replies]
            assert codes[0] == "rate_limited" and "real time" in replies[0]["message"]
            assert "dropped" in replies[0]["message"]
            # the frames after it found no open turn; turn_end too (listening had ended)
            assert codes[1:] == ["invalid_request"] * 6
            assert (after["status"], after["code"]) == ("error", "invalid_request") and "turn_start" in \
                after["message"]
            assert saved["status"] == "turn_saved"


async def test_a_huge_frame_is_refused_before_the_turn_encoding_thread_spends_anything_on_it(tiny_model_dir):
    """16 MiB of PCM at 8 kHz is 17 minutes of audio: refused while the turn-encoding thread is held busy, so
    without any of its work; the next frame of a sane size is taken."""
    huge = bytes(16 * 2**20)
    async with running_server(csm_slot(tiny_model_dir)) as server:
        for vad in (True, False):
            async with websockets.connect(url(server), max_size=None) as ws:
                await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": 8000, "vad": vad}))
                await marker(ws, "opened")
                gate = threading.Event()
                held = asyncio.get_running_loop().run_in_executor(server.service.turns.thread, gate.wait, 60)
                try:
                    await ws.send(huge)
                    refusal = await recv_json(ws, timeout=20)
                finally:
                    gate.set()
                    await held
                await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": 8000}))
                await ws.send(pcm16(speechlike(1.0, rate=8000)))
                await ws.send(json.dumps({"type": "turn_end", "text": "A sane turn."}))
                saved = await recv_json(ws)
            assert refusal["code"] == "rate_limited" and "real time" in refusal["message"]
            assert saved["status"] == "turn_saved" and saved["duration_s"] == pytest.approx(1.0, abs=0.01)


async def test_a_turn_or_utterance_left_open_is_dropped_after_the_turn_timeout_and_an_idle_listener_is_not(
        tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir), turn_timeout=1.5) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": 16000}))
            await ws.send(pcm16(speechlike(0.2, rate=16000)))  # ... and then nothing
            dropped, _, _ = await read_until(ws, lambda r: r.get("status") == "error", 30)
            await ws.send(json.dumps({"type": "turn_end", "text": "Too late."}))
            after = await recv_json(ws)

            await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": 16000, "vad": True}))
            await ws.send(pcm16(np.zeros(16000, np.float32)))
            await asyncio.sleep(3)  # twice the timeout, listening to silence: nothing is open
            speech = spoken("The weather is lovely today, isn't it?", 16000)
            await ws.send(pcm16(speech[: len(speech) // 2]))  # an utterance begins ... and its audio stops
            utterance_dropped, _, before = await read_until(ws, lambda r: r.get("status") == "error", 30)
            listening, _ = await marker(ws)
            saved = await turn(ws, audio_bytes(speechlike(1.0)), "Still here.")
    assert dropped["code"] == "client_too_slow" and "1.5 s" in dropped["message"]
    assert after["code"] == "invalid_request" and "turn_start" in after["message"]  # it was dropped
    assert [reply["status"] for reply, _ in before] == ["speech_start"]  # no error while the listener was idle
    assert utterance_dropped["code"] == "client_too_slow"
    assert listening["code"] == "unknown_request" and saved["status"] == "turn_saved"


async def test_listening_leaves_the_turn_encoding_threads_torch_thread_count_alone(tiny_model_dir):
    import torch

    async with running_server(csm_slot(tiny_model_dir)) as server:
        loop = asyncio.get_running_loop()
        before = await loop.run_in_executor(server.service.turns.thread, torch.get_num_threads)
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": 16000, "vad": True}))
            await ws.send(pcm16(spoken("Hello there.", 16000)))
            await marker(ws)
        after = await loop.run_in_executor(server.service.turns.thread, torch.get_num_threads)
    assert after == before
