"""The engine chain's two costs and one saving: cache hit vs miss, and the remote engine's first-byte overhead.

1. Cache: one server with CSM (tiny random by default, the CPU default
   --max-batch 4; ``--model-path`` for real weights) and the response cache on.
   The same seeded, context-off WebSocket request is timed from sending to its
   last byte and to its first streamed byte: as a miss (a new seed each run, so
   CSM runs) and as a hit (the seed of a request already answered).
2. Remote: server B speaks with Piper; server A has ``--engines remote`` with
   its remote at B.  The same OpenAI SDK request (streamed pcm) is timed to its
   first audio byte straight to B, and through A (A's remote engine calls B
   with the same SDK).  The difference is what the extra hop costs.

Both servers run in this process on loopback, each on its own thread and
event loop.  Prints medians and ratios against the baseline row.

    python bench/chain.py [--runs 15] [--model-path DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time

import websockets
from openai import OpenAI

from _common import machine, median, table
from tts_server.engines.csm import CsmEngine
from tts_server.engines.piper import PiperEngine
from tts_server.engines.remote import RemoteEngine
from tts_server.core.jobs import EngineSlot
from tts_server.api.server import TTSServer
from tts_server.engines.tiny_csm import build_checkpoint

TEXT = "A repeated greeting is made once and then served from memory."


class Background:
    """A started server on its own thread and event loop."""

    def __init__(self, *engines: EngineSlot, **options) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = TTSServer(*engines, host="127.0.0.1", port=0, **options)
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start())
            for slot in self.server.scheduler.chain.slots:
                self.loop.run_until_complete(slot.loaded.wait())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(300), "server did not start"

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


async def websocket_times(port: int, seed: int, stream: bool) -> tuple[float, float, bool]:
    """(first audio byte, last byte, whether it was a cache hit) for one request."""
    request = {"text": TEXT, "seed": seed, "context": False, "max_audio_length_ms": 2000, "stream": stream}
    async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
        started = time.perf_counter()
        await ws.send(json.dumps(request))
        first, reply = None, {}
        while True:
            frame = await ws.recv()
            if isinstance(frame, bytes):
                first = first or time.perf_counter() - started
                if not stream:
                    return first, time.perf_counter() - started, reply.get("cached", False)
                continue
            reply = json.loads(frame)
            if reply["status"] == "success" and stream:
                return first, time.perf_counter() - started, reply.get("cached", False)
            assert reply["status"] in ("success", "start"), reply


def cache_rows(model_path: str | None, runs: int) -> list[list]:
    folder = model_path or build_checkpoint(tempfile.mkdtemp(prefix="bench-chain-"))
    server = Background(EngineSlot(CsmEngine(lambda: folder, "cpu", "float32", max_batch=4)), cache_bytes=64 << 20)
    try:
        results: dict[tuple[str, bool], list[tuple[float, float]]] = {}
        for stream in (False, True):
            for run in range(runs):
                seed = 1000 * (run + 1) + stream
                miss = asyncio.run(websocket_times(server.port, seed, stream))
                hit = asyncio.run(websocket_times(server.port, seed, stream))
                assert not miss[2] and hit[2], "the repeat was not a cache hit"
                results.setdefault(("miss", stream), []).append(miss[:2])
                results.setdefault(("hit", stream), []).append(hit[:2])
    finally:
        server.stop()
    rows = []
    for stream in (False, True):
        base = median([t[1] for t in results[("miss", stream)]])
        for kind in ("miss", "hit"):
            first = median([t[0] for t in results[(kind, stream)]])
            last = median([t[1] for t in results[(kind, stream)]])
            rows.append([f"{'stream pcm' if stream else 'whole wav'}, {kind}", round(1000 * first, 2),
                         round(1000 * last, 2), round(last / base, 4)])
    return rows


def first_byte(port: int, model: str) -> float:
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=60)
    started = time.perf_counter()
    with client.audio.speech.with_streaming_response.create(model=model, voice="alloy", input=TEXT,
                                                            response_format="pcm") as response:
        chunks = response.iter_bytes()
        next(chunks)
        first = time.perf_counter() - started
        for _ in chunks:
            pass
    return first


def remote_rows(runs: int) -> list[list]:
    b = Background(EngineSlot(PiperEngine()))
    a = Background(EngineSlot(RemoteEngine(f"http://127.0.0.1:{b.port}/v1")))
    try:
        first_byte(b.port, "piper"), first_byte(a.port, "remote")  # warm both paths
        direct, through = [], []
        for _ in range(runs):
            direct.append(first_byte(b.port, "piper"))
            through.append(first_byte(a.port, "remote"))
    finally:
        a.stop()
        b.stop()
    base = median(direct)
    return [["OpenAI SDK -> B (Piper)", round(1000 * base, 2), 1.0, 0.0],
            ["OpenAI SDK -> A (remote) -> B", round(1000 * median(through), 2), round(median(through) / base, 4),
             round(1000 * (median(through) - base), 2)]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--model-path", default=None, help="a real CSM folder (default: a tiny random CSM)")
    args = parser.parse_args()
    print(f"Machine: {machine()}; {args.runs} runs each; medians\n")
    print("Response cache (CSM, 2 s of audio at most, same seeded request; ratio: time to last byte vs the miss)")
    print(table(["request", "first byte ms", "last byte ms", "ratio"], cache_rows(args.model_path, args.runs)))
    print("\nRemote engine first-byte overhead (Piper on B; A's remote engine calls B)")
    print(table(["path", "first audio byte ms", "ratio", "extra ms"], remote_rows(args.runs)))


if __name__ == "__main__":
    main()
