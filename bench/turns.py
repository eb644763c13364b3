"""The other side's turns: the wait at the end of a streamed turn, bytes stored, and session resume time.

One server (tiny random CSM) on loopback with a SQLite session store.  A turn is
streamed in 100 ms PCM pieces; once the server has taken every piece (a control
message answered after them is the sync point) the client sends ``turn_end``
and times it to ``turn_saved``: what is left to do then is the last partial
frame and the store, so a 2 s and a 20 s turn should wait the same.  With
``--stt-model`` the same turns are also sent without text and transcribed (the
transcription's share of the wait).  Then the bytes a minute of stored speech
takes, and how long resuming a session of 20 turns takes on SQLite, in memory
and (with ``--redis URL``) in Redis.

    python bench/turns.py [--runs 10] [--stt-model DIR] [--redis redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np
import websockets

from _common import machine, median, table
from tts_server.api.server import TTSServer
from tts_server.core.jobs import EngineSlot
from tts_server.engines.csm import CsmEngine
from tts_server.engines.stt import Transcriber
from tts_server.engines.tiny_csm import build_checkpoint


_SPOKEN: list[np.ndarray] = []


def speech(seconds: float) -> bytes:
    """``seconds`` of real speech (Piper's packaged voice, said once and repeated), 24 kHz 16-bit PCM."""
    if not _SPOKEN:
        from tts_server.audio.codec import resample
        from tts_server.engines.base import SynthesisTask, audio_only
        from tts_server.engines.piper import PiperEngine
        from tts_server.engines.request import SynthesisRequest

        voice = PiperEngine()
        voice.load()
        task = SynthesisTask(SynthesisRequest(text="The quick brown fox jumps over the lazy dog. She sells sea "
                                                   "shells by the sea shore.", request_id="bench"))
        _SPOKEN.append(resample(np.concatenate(list(audio_only(voice.synthesize(task)))), voice.sample_rate, 24000))
    once = _SPOKEN[0]
    audio = np.tile(once, int(seconds * 24000) // len(once) + 1)[: int(seconds * 24000)]
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


async def answered(ws) -> dict:
    while isinstance(frame := await ws.recv(), bytes):
        pass
    return json.loads(frame)


async def streamed_turn(ws, seconds: float, text: str | None = "What the user said.") -> float:
    """Seconds from ``turn_end`` to ``turn_saved`` for one streamed turn of ``seconds`` (``text`` None: the
    server transcribes it)."""
    await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": 24000}))
    data = speech(seconds)
    for start in range(0, len(data), 4800):
        await ws.send(data[start:start + 4800])
    await ws.send(json.dumps({"type": "cancel", "request_id": "sync"}))  # answered once every piece is taken
    assert (await answered(ws))["code"] == "unknown_request"
    started = time.perf_counter()
    await ws.send(json.dumps({"type": "turn_end", **({"text": text} if text else {})}))
    saved = await answered(ws)
    assert saved["status"] == "turn_saved", saved
    return time.perf_counter() - started


async def resume_time(port: int, session: str) -> float:
    async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
        started = time.perf_counter()
        await ws.send(json.dumps({"type": "session", "session": session}))
        reply = await answered(ws)
        elapsed = time.perf_counter() - started
    assert reply["turns"] == 20, reply
    return elapsed


async def run(runs: int, stt_model: str | None, redis: str | None) -> None:
    folder = build_checkpoint(Path(tempfile.mkdtemp()))
    database = Path(tempfile.mkdtemp()) / "sessions.db"
    stores = {"sqlite": f"sqlite:///{database}", "memory": "memory", **({"redis": redis} if redis else {})}
    stt = Transcriber(stt_model, "cpu", local_only=True) if stt_model else None
    servers = {name: TTSServer(EngineSlot(CsmEngine(lambda: folder, device="cpu")), host="127.0.0.1", port=0,
                               session_store=store, rate_limit=10**6, stt=stt if name == "sqlite" else None,
                               audio_burst_seconds=10**9)  # turns sent at full speed: the wait is measured, not the pace
               for name, store in stores.items()}
    for server in servers.values():
        await server.start()
        await server.service.scheduler.primary.loaded.wait()
    port = servers["sqlite"].port
    waits: dict[float, list[float]] = {2.0: [], 20.0: []}
    heard: dict[float, list[float]] = {2.0: [], 20.0: []}  # without text: transcribed
    sessions: dict[str, str] = {}
    try:
        async with websockets.connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
            await ws.send(json.dumps({"type": "session"}))
            await answered(ws)
            await streamed_turn(ws, 2.0)  # warm-up
            for _ in range(runs):
                for seconds in waits:
                    waits[seconds].append(await streamed_turn(ws, seconds))
                    if stt is not None:
                        heard[seconds].append(await streamed_turn(ws, seconds, None))
            await ws.send(json.dumps({"type": "session"}))  # a fresh session holding one minute of speech
            minute = (await answered(ws))["session"]
            await streamed_turn(ws, 60.0)
        with sqlite3.connect(database) as db:
            (stored,) = db.execute("SELECT SUM(LENGTH(codes) + LENGTH(CAST(text AS BLOB))) FROM turns WHERE session = ?",
                                   (minute,)).fetchone()
        for name, server in servers.items():  # sessions of 20 turns (10 s each) to resume
            async with websockets.connect(f"ws://127.0.0.1:{server.port}", max_size=None) as ws:
                await ws.send(json.dumps({"type": "session"}))
                sessions[name] = (await answered(ws))["session"]
                for _ in range(20):
                    await streamed_turn(ws, 10.0)
        resumes = {name: [await resume_time(servers[name].port, sessions[name]) for _ in range(runs)]
                   for name in servers}
    finally:
        for server in servers.values():
            await server.stop()
    base = median(waits[2.0])
    print(f"{machine()}; tiny random CSM; {runs} runs each; medians")
    rows = [[f"{seconds:g} s of speech, with its text", median(times) * 1000, median(times) / base, "-"]
            for seconds, times in waits.items()]
    rows += [[f"{seconds:g} s of speech, transcribed", median(times) * 1000, median(times) / base,
              f"{1 - median(waits[seconds]) / median(times):.3f}"] for seconds, times in heard.items() if times]
    print(table(["streamed turn", "turn_end -> turn_saved (ms)", "ratio", "transcription's share"], rows))
    print(f"\nstored for one minute of streamed speech: {stored} bytes ({stored / 1024:.1f} KiB)\n")
    memory = median(resumes["memory"])
    print(table(["store", "resume a 20-turn session (ms)", "ratio"],
                [[name, median(times) * 1000, median(times) / memory] for name, times in resumes.items()]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--stt-model", help="a faster-whisper model folder: also time transcribed turns")
    parser.add_argument("--redis", help="a Redis URL: also time resuming from Redis")
    args = parser.parse_args()
    asyncio.run(run(args.runs, args.stt_model, args.redis))
