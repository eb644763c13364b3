"""Time to first audio: the WebSocket stream vs OpenAI's POST /v1/audio/speech vs Wyoming, same server.

One server (tiny random CSM, the CPU default --max-batch 4, or Piper with
--engine piper) on loopback, with Wyoming on a second port; the same request
(speaker 0, no history, streamed 16-bit PCM) goes round the three interfaces,
RUNS times each, and the client measures from sending the request to
receiving its first audio byte.  Prints medians, the WebSocket as the
baseline, the ratio and the difference (the goal: under 10 ms apart).

With ``--against REV`` it compares two servers instead: ``run_server.py`` of
git revision REV (checked out in a temporary worktree) and of this tree, each
a process of its own with the same engine, measured in turn on every interface
in the same run; one row per interface: REV's median, this tree's, the ratio.
A second table gives the WebSocket fuzzer's rate (``_fuzz_rate``): on one
connection per server, FUZZ_FRAMES bad frames of a fixed seeded mix (each
answered by one error reply, checked first), sent one at a time, each awaited;
FUZZ_ROUNDS rounds, the two servers in turn; REV's median of frames answered
per second, this tree's, the ratio (not lower: 1 or more).

    python bench/interfaces.py [--runs 30] [--engine csm|piper]
                               [--against b8a3099 [--fuzz-frames 2000] [--fuzz-rounds 9]]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import websockets
from wyoming.client import AsyncTcpClient
from wyoming.tts import Synthesize

import _fuzz_rate
from _common import machine, median, table
from _servers import ROOT, checkout, free_port, start_server, stop
from tts_server.engines.csm import CsmEngine
from tts_server.engines.piper import PiperEngine
from tts_server.core.jobs import EngineSlot
from tts_server.api.server import TTSServer
from tts_server.engines.tiny_csm import build_checkpoint

TEXT = "The first words should arrive as soon as they exist."


async def over_websocket(port: int) -> float:
    async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
        started = time.perf_counter()
        await ws.send(json.dumps({"text": TEXT, "stream": True, "format": "pcm"}))
        while not isinstance(await ws.recv(), bytes):
            pass
        first = time.perf_counter() - started
        while not (isinstance(frame := await ws.recv(), str) and json.loads(frame)["status"] == "success"):
            pass
    return first


async def over_http(port: int) -> float:
    """A plain HTTP/1.1 client on a raw socket: the first body byte after the head is the first audio byte."""
    body = json.dumps({"model": "tts-1", "voice": "0", "input": TEXT, "response_format": "pcm"}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.perf_counter()
    writer.write(b"POST /v1/audio/speech HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    await reader.readuntil(b"\r\n")  # the first chunk's size line; its data is the first audio
    await reader.readexactly(1)
    first = time.perf_counter() - started
    await reader.read()  # the rest, to the end of the response
    writer.close()
    return first


async def over_wyoming(port: int) -> float:
    """The ``wyoming`` package's client, as Home Assistant uses it: a connection per request."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        started = time.perf_counter()
        await client.write_event(Synthesize(text=TEXT).event())
        while (await client.read_event()).type != "audio-chunk":
            pass
        first = time.perf_counter() - started
        while (await client.read_event()).type != "audio-stop":
            pass
    return first


async def main(runs: int, engine: str) -> None:
    if engine == "piper":
        slot = EngineSlot(PiperEngine())
    else:
        folder = build_checkpoint(tempfile.mkdtemp())
        slot = EngineSlot(CsmEngine(lambda: folder, device="cpu", max_batch=4))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        wyoming_port = probe.getsockname()[1]
    server = TTSServer(slot, host="127.0.0.1", port=0, wyoming_uri=f"tcp://127.0.0.1:{wyoming_port}")
    await server.start()
    await slot.loaded.wait()
    clients = {"websocket": (over_websocket, server.port), "http": (over_http, server.port),
               "wyoming": (over_wyoming, wyoming_port)}
    for measure, port in clients.values():
        await measure(port)  # warm-up
    times = {name: [] for name in clients}
    for _ in range(runs):
        for name, (measure, port) in clients.items():
            times[name].append(await measure(port))
    await server.stop()
    ws = median(times["websocket"])
    rows = [["WebSocket stream (baseline)", "websocket"], ["POST /v1/audio/speech, pcm", "http"],
            ["Wyoming synthesize", "wyoming"]]
    print(f"{machine()}; engine {engine}; {runs} runs each, in turn; median time to first audio byte")
    print(table(["interface", "first audio byte (ms)", "ratio", "difference (ms)"],
                [[label, median(times[name]) * 1000, median(times[name]) / ws, (median(times[name]) - ws) * 1000]
                 for label, name in rows]))


def start_process(root: Path, engine: str, model: Path, work: Path) -> tuple[subprocess.Popen, int, int]:
    """``run_server.py`` of the tree at ``root``, with Wyoming on a second port; returns once it serves."""
    wyoming_port = free_port()
    args = ["--engine", "piper"] if engine == "piper" else ["--engine", "csm", "--mode", "reuse", "--model-path",
                                                             str(model)]
    proc, port = start_server(root, ["--wyoming-uri", f"tcp://127.0.0.1:{wyoming_port}", *args], work)
    return proc, port, wyoming_port


async def fuzz_rates(ports: dict[str, int], frames: int, rounds: int) -> dict[str, list[float]]:
    """Frames answered per second on each server, ``rounds`` times, the servers' order swapped every round."""
    for port in ports.values():
        await asyncio.wait_for(_fuzz_rate.check(port), 120)
    mix, rates = _fuzz_rate.mix(frames), {who: [] for who in ports}
    for turn in range(rounds):
        for who in (list(ports) if turn % 2 == 0 else list(ports)[::-1]):
            rates[who].append(await asyncio.wait_for(_fuzz_rate.rate(ports[who], mix), 600))
    return rates


async def compare(runs: int, engine: str, revision: str, fuzz_frames: int, fuzz_rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with checkout(revision, tmp / "baseline") as baseline:
            model = build_checkpoint(tmp / "model") if engine == "csm" else tmp
            servers = {}
            try:
                servers = {"baseline": start_process(baseline, engine, model, tmp / "b"),
                           "now": start_process(ROOT, engine, model, tmp / "n")}
                measures = {"websocket": over_websocket, "http": over_http, "wyoming": over_wyoming}
                times = {(who, name): [] for who in servers for name in measures}
                for who, (_, port, wyoming_port) in servers.items():
                    for name, measure in measures.items():
                        await asyncio.wait_for(measure(wyoming_port if name == "wyoming" else port), 120)  # warm-up
                for _ in range(runs):
                    for name, measure in measures.items():
                        for who, (_, port, wyoming_port) in servers.items():
                            times[who, name].append(await asyncio.wait_for(
                                measure(wyoming_port if name == "wyoming" else port), 120))
                rates = await fuzz_rates({who: port for who, (_, port, _) in servers.items()}, fuzz_frames,
                                         fuzz_rounds)
            finally:
                for proc, _, _ in servers.values():
                    stop(proc)
    print(f"{machine()}; engine {engine}; {runs} runs each, in turn; median time to first audio byte; "
          f"baseline = {revision}")
    rows = []
    for name in measures:
        before, after = median(times["baseline", name]), median(times["now", name])
        rows.append([name, before * 1000, after * 1000, after / before, (after - before) * 1000])
    print(table(["interface", f"{revision} (ms)", "this tree (ms)", "ratio", "difference (ms)"], rows))
    before, after = median(rates["baseline"]), median(rates["now"])
    print(f"\n{fuzz_rounds} rounds of {fuzz_frames} bad frames each ({len(_fuzz_rate.KINDS)} kinds, seed "
          f"{_fuzz_rate.SEED}), one connection per server, the servers in turn; median rate")
    print(table(["measure", revision, "this tree", "ratio", "difference"],
                [["WebSocket fuzzer, frames answered/s", before, after, after / before, after - before]]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--engine", choices=["csm", "piper"], default="csm")
    parser.add_argument("--against", metavar="REV", help="compare with run_server.py of this git revision")
    parser.add_argument("--fuzz-frames", type=int, default=2000, help="with --against: bad frames per round")
    parser.add_argument("--fuzz-rounds", type=int, default=9, help="with --against: rounds of the fuzzer's rate")
    args = parser.parse_args()
    socket.setdefaulttimeout(60)
    if args.against:
        asyncio.run(compare(args.runs, args.engine, args.against, args.fuzz_frames, args.fuzz_rounds))
    else:
        asyncio.run(main(args.runs, args.engine))
