"""Load: N concurrent connections x M requests each, against the tiny CSM or Piper, on loopback only.

Reports how every request ended (success / busy / other errors / unanswered --
the last two must be 0), time to first audio percentiles, throughput, and the
process's resident memory before and after (after one identical warm-up round;
growth should stay under 5 %).  Bounded in count and time; stops by itself.

    python bench/load.py [--engine csm|piper] [--connections 64] [--requests 20] [--extra-rounds 0] [--max-batch 4]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def client(port: int, index: int, requests: int, outcomes: collections.Counter, ttfa: list[float],
                 deadline: float) -> None:
    import websockets

    async with websockets.connect(f"ws://127.0.0.1:{port}", max_queue=None) as ws:
        for n in range(requests):
            rid = f"c{index}-r{n}"
            await ws.send(json.dumps({"text": f"Client {index} says hello number {n}.", "request_id": rid,
                                      "stream": True, "max_audio_length_ms": 480}))
            sent, first, status = time.perf_counter(), None, "unanswered"
            try:
                while True:
                    frame = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
                    if isinstance(frame, bytes):
                        first = first or time.perf_counter()
                        continue
                    reply = json.loads(frame)
                    if reply.get("request_id") == rid and reply["status"] in ("success", "error", "cancelled"):
                        status = reply["status"] if reply["status"] != "error" else reply["code"]
                        break
            except asyncio.TimeoutError:
                pass
            outcomes[status] += 1
            if status == "success" and first:
                ttfa.append(first - sent)
            if status == "busy":
                await asyncio.sleep(0.2)  # back off as a polite client would


async def run_load(port: int, connections: int, requests: int, timeout: float = 600) -> dict:
    """Drive the server at ``port``; returns counts, latency percentiles and throughput."""
    outcomes: collections.Counter = collections.Counter()
    ttfa: list[float] = []
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    await asyncio.gather(*(client(port, i, requests, outcomes, ttfa, deadline) for i in range(connections)))
    elapsed = time.perf_counter() - started
    q = statistics.quantiles(ttfa, n=100) if len(ttfa) >= 2 else [float("nan")] * 99
    return {"outcomes": dict(outcomes), "elapsed_s": elapsed, "requests_per_s": outcomes["success"] / elapsed,
            "ttfa_p50_ms": 1000 * q[49], "ttfa_p95_ms": 1000 * q[94], "ttfa_p99_ms": 1000 * q[98]}


async def main(engine: str, connections: int, requests: int, extra_rounds: int, max_batch: int) -> None:
    from tts_server.app import limit_malloc_arenas
    from tts_server.engines.csm import CsmEngine
    from tts_server.engines.piper import PiperEngine
    from tts_server.core.jobs import EngineSlot
    from tts_server.api.server import TTSServer
    from tts_server.engines.tiny_csm import build_checkpoint

    limit_malloc_arenas()  # as run_server.py does
    if engine == "csm":
        folder = build_checkpoint(tempfile.mkdtemp(prefix="load-tiny-"))
        slot = EngineSlot(CsmEngine(lambda: folder, device="cpu", max_batch=max_batch))
    else:
        slot = EngineSlot(PiperEngine())
    server = TTSServer(slot, host="127.0.0.1", port=0, max_connections_per_address=connections + 1,
                       rate_limit=10**6)
    await server.start()
    await slot.loaded.wait()
    await run_load(server.port, connections, requests)  # warm-up: one round identical to the measured one
    before = rss_mb()
    result = await run_load(server.port, connections, requests)
    after = rss_mb()
    rounds = [after]
    for _ in range(extra_rounds):  # does memory keep growing, or has it settled?
        await run_load(server.port, connections, requests)
        rounds.append(rss_mb())
    await server.stop()
    batch = f", --max-batch {max_batch}" if engine == "csm" else ""
    print(f"{engine}{batch}: {connections} connections x {requests} requests in {result['elapsed_s']:.1f} s")
    print(f"outcomes: {result['outcomes']}")
    print(f"successes/s: {result['requests_per_s']:.1f}; time to first audio p50 {result['ttfa_p50_ms']:.0f} ms, "
          f"p95 {result['ttfa_p95_ms']:.0f} ms, p99 {result['ttfa_p99_ms']:.0f} ms")
    print(f"RSS after warm-up {before:.0f} MB, after the run {after:.0f} MB ({100 * (after / before - 1):+.1f}%)")
    if extra_rounds:
        print("RSS after each further round: " + ", ".join(f"{r:.0f} MB" for r in rounds[1:])
              + f" ({100 * (rounds[-1] / rounds[0] - 1):+.1f}% over {extra_rounds} rounds)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=["csm", "piper"], default="csm")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--extra-rounds", type=int, default=0, help="repeat the run to see whether memory settles")
    parser.add_argument("--max-batch", type=int, default=4, help="CSM batch rows (4: a CPU server's default)")
    args = parser.parse_args()
    asyncio.run(main(args.engine, args.connections, args.requests, args.extra_rounds, args.max_batch))
