"""Piper through our server vs piper-tts called directly, on the same text.

Prints the real-time factor (wall time / audio time) of each path and their
speed ratio (direct RTF / server RTF; 1.0 = no overhead, goal >= 0.9).  Both
run in this process, alternating, so machine noise hits both alike.

    python bench/piper_engine.py [--runs 7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from _common import machine, median, table

TEXT = ("The quick brown fox jumps over the lazy dog. A self-hosted speech server should answer quickly, "
        "and it should sound the same every time. This paragraph has three sentences.")


def direct_rtf(engine) -> float:
    from piper import SynthesisConfig

    started = time.perf_counter()
    samples = sum(len(c.audio_float_array) for c in engine.voices[0].model.synthesize(TEXT, SynthesisConfig()))
    return (time.perf_counter() - started) / (samples / engine.sample_rate)


async def server_rtf(port: int) -> float:
    import websockets

    async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
        started = time.perf_counter()
        await ws.send(json.dumps({"text": TEXT, "engine": "piper"}))
        meta = json.loads(await ws.recv())
        await ws.recv()
        return (time.perf_counter() - started) / meta["duration_s"]


async def main(runs: int) -> None:
    from tts_server.engines.piper import PiperEngine
    from tts_server.core.jobs import EngineSlot
    from tts_server.api.server import TTSServer

    engine = PiperEngine()
    server = TTSServer(EngineSlot(engine), host="127.0.0.1", port=0)
    await server.start()
    await server.service.scheduler.primary.loaded.wait()
    direct_rtf(engine), await server_rtf(server.port)  # warm-up
    direct, ours = [], []
    for _ in range(runs):
        direct.append(await asyncio.to_thread(direct_rtf, engine))
        ours.append(await server_rtf(server.port))
    await server.stop()
    d, s = median(direct), median(ours)
    print(f"machine: {machine()}; {runs} runs each, medians; text: {len(TEXT)} chars")
    print(table(["path", "RTF (median)", "speed vs direct"],
                [["piper-tts direct", d, 1.0], ["our server (WAV over WebSocket)", s, d / s]]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    asyncio.run(main(parser.parse_args().runs))
