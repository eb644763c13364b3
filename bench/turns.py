"""The other side's turns: the wait at the end of a streamed turn, bytes stored, and session resume time.

One server (tiny random CSM) on loopback with a SQLite session store.  A turn is
streamed in 100 ms PCM pieces; once the server has taken every piece (a control
message answered after them is the sync point) the client sends ``turn_end``
and times it to ``turn_saved``: what is left to do then is the last partial
frame and the store, so a 2 s and a 20 s turn should wait the same.  Then the
bytes a minute of stored speech takes, and how long resuming a session of 20
turns takes on SQLite and in memory.

    python bench/turns.py [--runs 10]
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
from tts_server.engines.tiny_csm import build_checkpoint


def speech(seconds: float, seed: int = 0) -> bytes:
    t = np.arange(int(seconds * 24000)) / 24000
    tone = sum(np.sin(2 * np.pi * 140 * k * t + k) / k for k in range(1, 6)) * np.clip(np.sin(2 * np.pi * 3 * t), 0, 1)
    noise = np.random.default_rng(seed).normal(0, 1e-3, len(t))
    return (np.clip(0.3 * tone / np.abs(tone).max() + noise, -1, 1) * 32767).astype("<i2").tobytes()


async def answered(ws) -> dict:
    while isinstance(frame := await ws.recv(), bytes):
        pass
    return json.loads(frame)


async def streamed_turn(ws, seconds: float) -> float:
    """Seconds from ``turn_end`` to ``turn_saved`` for one streamed turn of ``seconds``."""
    await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": 24000}))
    data = speech(seconds)
    for start in range(0, len(data), 4800):
        await ws.send(data[start:start + 4800])
    await ws.send(json.dumps({"type": "cancel", "request_id": "sync"}))  # answered once every piece is taken
    assert (await answered(ws))["code"] == "unknown_request"
    started = time.perf_counter()
    await ws.send(json.dumps({"type": "turn_end", "text": "What the user said."}))
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


async def run(runs: int) -> None:
    folder = build_checkpoint(Path(tempfile.mkdtemp()))
    database = Path(tempfile.mkdtemp()) / "sessions.db"
    servers = {name: TTSServer(EngineSlot(CsmEngine(lambda: folder, device="cpu")), host="127.0.0.1", port=0,
                               session_store=store, rate_limit=10**6)
               for name, store in (("sqlite", f"sqlite:///{database}"), ("memory", "memory"))}
    for server in servers.values():
        await server.start()
        await server.scheduler.primary.loaded.wait()
    port = servers["sqlite"].port
    waits: dict[float, list[float]] = {2.0: [], 20.0: []}
    sessions: dict[str, str] = {}
    try:
        async with websockets.connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
            await ws.send(json.dumps({"type": "session"}))
            await answered(ws)
            await streamed_turn(ws, 2.0)  # warm-up
            for _ in range(runs):
                for seconds in waits:
                    waits[seconds].append(await streamed_turn(ws, seconds))
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
    print(table(["streamed turn", "turn_end -> turn_saved (ms)", "ratio"],
                [[f"{seconds:g} s of speech", median(times) * 1000, median(times) / base]
                 for seconds, times in waits.items()]))
    print(f"\nstored for one minute of streamed speech: {stored} bytes ({stored / 1024:.1f} KiB)\n")
    memory = median(resumes["memory"])
    print(table(["store", "resume a 20-turn session (ms)", "ratio"],
                [[name, median(times) * 1000, median(times) / memory] for name, times in resumes.items()]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    asyncio.run(run(parser.parse_args().runs))
