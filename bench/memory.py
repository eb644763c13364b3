"""Memory per connection: N connections each holding an idle hands-free listener, then each holding an open streamed
turn of T seconds (tiny CSM, loopback only).

The server runs in a child process (``--serve``), so its resident memory is read from ``/proc`` untouched by the
clients.  It runs with an audio allowance large enough to take each turn at full speed (``audio_burst_seconds``):
what is measured is what an open turn holds, not the pace.  Reported: RSS with N bare connections, and the growth
per connection once each holds a listener, then a turn (the listeners are closed first).  An RSS figure is an upper
bound: memory the allocator keeps after the frames were processed counts too.  ``measure`` can be imported.

    python bench/memory.py [--connections 64] [--turn-seconds 120] [--rate 16000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _synced(ws, name: str) -> None:
    """Wait until every frame sent before is processed (a cancel of an unknown id is answered in order)."""
    await ws.send(json.dumps({"type": "cancel", "request_id": name}))
    while True:
        frame = await asyncio.wait_for(ws.recv(), 600)
        if isinstance(frame, str):
            reply = json.loads(frame)
            if reply.get("request_id") == name:
                return
            if reply.get("status") == "error":
                raise RuntimeError(f"the server refused: {reply}")


async def measure(port: int, pid: int, connections: int = 64, turn_seconds: float = 120,
                  rate: int = 16000) -> dict[str, float]:
    """RSS of the server ``pid`` at ``port`` with ``connections`` bare connections, and its growth per connection
    (MiB) with an idle listener each, then an open streamed turn of ``turn_seconds`` each."""
    import numpy as np
    import websockets

    speech = (np.random.default_rng(0).normal(0, 0.05, int(rate * turn_seconds)).clip(-1, 1) * 32767)
    pcm = speech.astype("<i2").tobytes()  # noise: the codec encodes it like speech
    piece = rate * 2  # one second a frame

    async def listen(ws) -> None:
        await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": rate, "vad": True}))
        await ws.send(bytes(piece))  # a second of silence: listening, nothing open
        await _synced(ws, "listening")

    async def stream(ws, audio: bytes) -> None:
        await ws.send(json.dumps({"type": "turn_end"}))
        await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": rate}))
        for offset in range(0, len(audio), piece):
            await ws.send(audio[offset:offset + piece])
            if offset // piece % 10 == 9:  # a short backlog: its pongs are read in time on a busy machine
                await _synced(ws, "streaming")
        await _synced(ws, "streamed")

    async with websockets.connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:  # one-time loads: VAD, codec
        await listen(ws)
        await stream(ws, pcm[: piece * 5])
    sockets = [await websockets.connect(f"ws://127.0.0.1:{port}", max_size=None) for _ in range(connections)]
    try:
        await asyncio.gather(*(_synced(ws, "bare") for ws in sockets))
        bare = rss_mib(pid)
        await asyncio.gather(*(listen(ws) for ws in sockets))
        listening = rss_mib(pid)
        for ws in sockets:  # one after the other: a backlog of minutes on one socket would delay its pings
            await stream(ws, pcm)
        streaming = rss_mib(pid)
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return {"bare_mib": bare, "listener_mib_each": (listening - bare) / connections,
            "turn_mib_each": (streaming - bare) / connections, "turn_seconds": turn_seconds}


async def _serve(connections: int) -> None:
    from tts_server.api.server import TTSServer
    from tts_server.app import limit_malloc_arenas
    from tts_server.core.jobs import EngineSlot
    from tts_server.engines.csm import CsmEngine
    from tts_server.engines.tiny_csm import build_checkpoint

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    limit_malloc_arenas()  # as run_server.py does
    folder = build_checkpoint(tempfile.mkdtemp(prefix="memory-tiny-"))
    slot = EngineSlot(CsmEngine(lambda: folder, device="cpu"))
    import inspect

    from tts_server.core.service import Service

    unpaced = {"audio_burst_seconds": 10**9, "turn_timeout": 3600}  # (a server from before these limits has neither)
    unpaced = {k: v for k, v in unpaced.items() if k in inspect.signature(Service.__init__).parameters}
    server = TTSServer(slot, host="127.0.0.1", port=0, max_connections_per_address=connections + 1,
                       rate_limit=10**6, **unpaced)
    await server.start()
    await slot.loaded.wait()
    print(server.port, flush=True)
    await asyncio.to_thread(sys.stdin.read)  # until the parent closes our stdin
    await server.stop()


def main(connections: int, turn_seconds: float, rate: int) -> None:
    child = subprocess.Popen([sys.executable, __file__, "--serve", "--connections", str(connections)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        while not (line := child.stdout.readline()).strip().isdigit():
            if not line:
                raise RuntimeError("the server did not start")
        port = int(line)
        result = asyncio.run(measure(port, child.pid, connections, turn_seconds, rate))
    finally:
        child.stdin.close()
        child.wait(60)
    print(f"{connections} connections at {rate} Hz: RSS {result['bare_mib']:.0f} MiB with bare connections; "
          f"per connection: idle listener +{result['listener_mib_each']:.2f} MiB, open {turn_seconds:g} s "
          f"streamed turn +{result['turn_mib_each']:.2f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--turn-seconds", type=float, default=120)
    parser.add_argument("--rate", type=int, default=16000, help="the clients' PCM rate")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.connections))
    else:
        main(args.connections, args.turn_seconds, args.rate)
