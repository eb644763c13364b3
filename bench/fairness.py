"""Fairness: what one client's worst case costs another user, and what an open turn or listener costs in memory.

One server on loopback (tiny random CSM, the packaged Whisper base as --stt-model, Silero VAD, a chat server
speaking OpenAI's streamed wire format that writes one sentence and then only text-less chunks).  The *victim*
sends a 2.4 s turn without text (transcribed by Whisper) and then a one-line synthesis, and times each to
``turn_saved`` / ``success``: first alone, then while attackers run the worst cases of issue #27 at once:

1. two clients ask CSM for 20 sentences each with ``timestamps`` (20 word alignments each on the speech
   recognition thread), and two more do the same and hang up at their first audio;
2. a hands-free client speaks ~60 s with a short gap every 2 s (a transcription may start at every pause);
3. two listeners each send three 16 MiB frames of 8 kHz silence (17 minutes of audio a frame);
9. two ``respond`` answers whose chat model sends one sentence and then only keep-alives.

Ratios (under attack / alone, medians) are the goal: at most 2x.  Then ``bench/memory.py``: the server's resident
memory with 64 connections each holding an idle listener, and 64 each holding a streamed turn of 2 minutes, per
connection.

    python bench/fairness.py --stt-model DIR [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import websockets

import memory
from _common import machine, median, table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fake_chat import FakeChat  # noqa: E402
from tts_server.api.server import TTSServer  # noqa: E402
from tts_server.audio.codec import resample  # noqa: E402
from tts_server.core.jobs import EngineSlot  # noqa: E402
from tts_server.engines.base import SynthesisTask, audio_only  # noqa: E402
from tts_server.engines.chat import ChatModel  # noqa: E402
from tts_server.engines.csm import CsmEngine  # noqa: E402
from tts_server.engines.request import SynthesisRequest  # noqa: E402
from tts_server.engines.stt import Transcriber  # noqa: E402
from tts_server.engines.tiny_csm import build_checkpoint  # noqa: E402

SAID = "I would like to book a table for two tonight."
LONG = " ".join(f"This is sentence number {n} of a long answer." for n in range(1, 21))
RATE = 16000
PIECE = 640  # 40 ms of 16 kHz PCM


def piper_speech() -> np.ndarray:
    from tts_server.engines.piper import PiperEngine

    voice = PiperEngine()
    voice.load()
    audio = np.concatenate(list(audio_only(voice.synthesize(SynthesisTask(SynthesisRequest(text=SAID, request_id="b"))))))
    return resample(audio, voice.sample_rate, RATE)


def pcm(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


async def _until(ws, statuses: set[str], timeout: float = 600) -> dict:
    while True:
        frame = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(frame, str):
            reply = json.loads(frame)
            if reply.get("status") in statuses:
                return reply


async def victim(port: int, wav: bytes) -> tuple[float, float]:
    """Seconds from sending a turn without text to ``turn_saved``, and from a one-line synthesis to ``success``."""
    async with websockets.connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
        started = time.perf_counter()
        await ws.send(json.dumps({"type": "turn", "speaker": 1}))
        await ws.send(wav)
        reply = await _until(ws, {"turn_saved", "error"})
        turn = time.perf_counter() - started
        assert reply["status"] == "turn_saved", reply
        started = time.perf_counter()
        await ws.send(json.dumps({"text": "Hello there.", "seed": 1, "max_audio_length_ms": 800}))
        reply = await _until(ws, {"success", "error"})
        assert reply["status"] == "success", reply
        return turn, time.perf_counter() - started


async def alignments(port: int, hang_up: bool) -> None:
    """Item 1: a long CSM reply with word times (an alignment per sentence); or the same, gone at its first audio."""
    async with websockets.connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
        await ws.send(json.dumps({"text": LONG, "seed": 2, "timestamps": True, "stream": True}))
        while True:
            frame = await ws.recv()
            if hang_up and isinstance(frame, bytes):
                return
            if isinstance(frame, str) and json.loads(frame).get("status") in ("success", "error"):
                return


async def pauses(port: int, speech: np.ndarray) -> None:
    """Item 2: an utterance with a short gap every 2 s, streamed at real time (~60 s)."""
    gap = np.zeros(int(RATE * 0.3), np.float32)
    audio = np.concatenate([np.concatenate([speech[:2 * RATE], gap]) for _ in range(26)])
    async with websockets.connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
        await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": RATE, "vad": True}))
        data, started = pcm(audio), time.perf_counter()
        for offset in range(0, len(data), PIECE * 2):
            await asyncio.sleep(max(0.0, started + offset / 2 / RATE - time.perf_counter()))
            await ws.send(data[offset:offset + PIECE * 2])


async def flood(port: int) -> None:
    """Item 3: three 16 MiB frames of 8 kHz silence to a listener."""
    frame = bytes(16 * 2**20 - 64)
    with contextlib.suppress(websockets.ConnectionClosed):
        async with websockets.connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
            await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": 8000, "vad": True}))
            for _ in range(3):
                await ws.send(frame)
            await asyncio.sleep(1)


async def keep_alives(port: int) -> None:
    """Item 9: an answer whose chat model writes one sentence and then only chunks without text."""
    async with websockets.connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
        await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": RATE}))
        await ws.send(bytes(RATE // 5 * 2))
        await ws.send(json.dumps({"type": "turn_end", "text": "Tell me something."}))
        await _until(ws, {"turn_saved"})
        await ws.send(json.dumps({"type": "respond", "speaker": 0, "seed": 3}))
        await _until(ws, {"success", "error", "cancelled"})


async def measure(server: TTSServer, wav: bytes, runs: int) -> list[tuple[float, float]]:
    return [await victim(server.port, wav) for _ in range(runs)]


async def run(stt_model: str, runs: int) -> None:
    folder = build_checkpoint(Path(tempfile.mkdtemp()))
    speech = piper_speech()
    buffer = io.BytesIO()
    sf.write(buffer, np.concatenate([speech, np.zeros(RATE // 2, np.float32)]), RATE, format="WAV")
    wav = buffer.getvalue()
    with FakeChat("Here is one sentence. And", idle=0.2) as chat:
        server = TTSServer(EngineSlot(CsmEngine(lambda: folder, device="cpu")), host="127.0.0.1", port=0,
                           session_store="memory", stt=Transcriber(stt_model, "cpu", local_only=True),
                           chat=ChatModel(chat.url, "bench"), rate_limit=10**6, max_connections=1000,
                           max_connections_per_address=1000)
        await server.start()
        try:
            await server.service.scheduler.primary.loaded.wait()
            await server.service.speech.loaded.wait()
            await victim(server.port, wav)  # warm-up
            alone = await measure(server, wav, runs)
            attacks = [asyncio.create_task(work) for work in [
                alignments(server.port, False), alignments(server.port, False), alignments(server.port, True),
                alignments(server.port, True), pauses(server.port, speech), flood(server.port), flood(server.port),
                keep_alives(server.port), keep_alives(server.port)]]
            await asyncio.sleep(3)  # the backlogs are queued
            attacked = await measure(server, wav, runs)
            for task in attacks:
                task.cancel()
            await asyncio.gather(*attacks, return_exceptions=True)
        finally:
            await server.stop()
    print(f"{machine()}; tiny random CSM, Whisper base int8, Silero VAD; {runs} runs each; medians")
    rows = []
    for index, name in enumerate(["a 2.4 s turn, transcribed (turn_saved)", "a one-line synthesis (success)"]):
        quiet, busy = median([t[index] for t in alone]), median([t[index] for t in attacked])
        rows.append([name, quiet * 1000, busy * 1000, busy / quiet])
    print(table(["the victim's request", "alone (ms)", "under attack (ms)", "ratio"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stt-model", required=True, help="a faster-whisper model folder")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    asyncio.run(run(args.stt_model, args.runs))
    print()
    memory.main(args.connections, 120, RATE)  # its own server, in a child process: RSS untouched by clients
