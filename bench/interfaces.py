"""Time to first audio: the WebSocket stream vs OpenAI's POST /v1/audio/speech vs Wyoming, same server.

One server (tiny random CSM, the CPU default --max-batch 4, or Piper with
--engine piper) on loopback, with Wyoming on a second port; the same request
(speaker 0, no history, streamed 16-bit PCM) goes round the three interfaces,
RUNS times each, and the client measures from sending the request to
receiving its first audio byte.  Prints medians, the WebSocket as the
baseline, the ratio and the difference (the goal: under 10 ms apart).

    python bench/interfaces.py [--runs 30] [--engine csm|piper]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import tempfile
import time

import websockets
from wyoming.client import AsyncTcpClient
from wyoming.tts import Synthesize

from _common import machine, median, table
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
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--engine", choices=["csm", "piper"], default="csm")
    args = parser.parse_args()
    socket.setdefaulttimeout(60)
    asyncio.run(main(args.runs, args.engine))
