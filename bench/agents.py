"""Agent frameworks: first audio after the first sentence's text arrives, through Pipecat vs our WebSocket directly.

One server (``run_server.py`` as a child process on loopback: tiny random CSM
by default, the CPU default --max-batch 4; or Piper with --engine piper) and
four clients in this process, each kept connected across runs (one warm-up
reply each first, so no connection setup is counted), taking turns every run
(the order rotating, 0.2 s apart) so that load drift hits all alike.  Each run
speaks the same two sentences, ``context`` off (every run alike, no history):

1. direct WebSocket (the baseline): a ``synthesize`` with ``text_stream`` and
   the first sentence as a ``text`` piece with ``flush``, sent back to back;
   timed from sending them to the first binary audio frame.  Then the second
   sentence and ``text_end``, read to ``success``.
2. ``CSMTTSService`` (tts_server/integrations/pipecat.py) in a running Pipecat
   pipeline [probe, service, probe] at 24000 Hz (the server's rate: no
   resampling), with the same ``synthesize`` fields as path 1: timed from the
   probe before the service pushing the LLMTextFrame that completes the first
   sentence (the sentence and the next word, as an LLM's tokens come: Pipecat's
   sentence aggregator releases a sentence once the next word starts) to the
   first ``TTSAudioRawFrame`` the service pushes.  Its client notes when it sent
   the ``synthesize`` and read the first audio, which splits that time into
   the service's own (text frame -> sent, read -> audio frame) and the server's.
3. Pipecat's ``OpenAITTSService`` on our ``/v1`` (voice alloy, model tts-1), in
   the same kind of pipeline, timed the same way.
4. For 3's sake, the OpenAI SDK alone on ``/v1`` (streamed pcm, the first
   sentence): request to first bytes.  Pipecat's service reads in chunks of its
   ``chunk_size`` (0.5 s of audio): its first frame waits for that much audio.

Prints median and 90th percentile per path, ratio and difference to the direct
WebSocket, the service's own time, and whether it is under 5 ms.

    python bench/agents.py [--runs 20] [--engine csm|piper]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import websockets
from loguru import logger
from openai import AsyncOpenAI
from pipecat.frames.frames import (EndFrame, Frame, LLMFullResponseEndFrame, LLMFullResponseStartFrame,
                                   LLMTextFrame, StartFrame, TTSAudioRawFrame)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.openai.tts import OpenAITTSService
from pipecat.workers.runner import WorkerRunner

from _common import machine, median, table
from _servers import ROOT, start_server, stop
from tts_server.engines.tiny_csm import build_checkpoint
from tts_server.integrations.pipecat import CSMTTSService
from tts_server.integrations.wire import CSMClient

FIRST = "First words come fast. "
NEXT_WORD = "Then"  # the token after the first sentence, which lets Pipecat's aggregator release it
REST = " the rest."
RATE = 24000
SETTLE_S = 0.2  # between runs: the previous reply's tail work (client and server) is done
# What CSMTTSService sends in every synthesize (its default timestamps and progress), so the direct path asks for
# exactly the same work; context off, so every run is alike.
OPTIONS = {"timestamps": True, "progress": True, "context": False}


class Direct:
    """Our WebSocket with no framework: one open connection, one streamed text per run."""

    def __init__(self, port: int) -> None:
        self.port, self.ws, self.runs = port, None, 0

    async def measure(self) -> float:
        self.ws = self.ws or await websockets.connect(f"ws://127.0.0.1:{self.port}", max_size=None)
        self.runs += 1
        request = f"direct-{self.runs}"
        opening = [json.dumps(m) for m in ({"type": "synthesize", "request_id": request, "text_stream": True,
                                             "stream": True, "format": "pcm", "speaker": 0, **OPTIONS},
                                            {"type": "text", "request_id": request, "delta": FIRST, "flush": True})]
        started = time.perf_counter()
        for message in opening:
            await self.ws.send(message)
        while not isinstance(await self.ws.recv(), bytes):
            pass
        first = time.perf_counter() - started
        for message in ({"type": "text", "request_id": request, "delta": NEXT_WORD + REST, "flush": True},
                        {"type": "text_end", "request_id": request}):
            await self.ws.send(json.dumps(message))
        while not (isinstance(frame := await self.ws.recv(), str) and json.loads(frame)["status"] == "success"):
            assert not (isinstance(frame, str) and json.loads(frame)["status"] == "error"), frame
        return first

    async def stop(self) -> None:
        await self.ws.close()


class OpenAISDK:
    """The OpenAI SDK alone on /v1, streamed raw PCM read as it comes (the HTTP connection kept alive)."""

    def __init__(self, port: int) -> None:
        self.client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")

    async def measure(self) -> float:
        started, first = time.perf_counter(), None
        async with self.client.audio.speech.with_streaming_response.create(
                model="tts-1", voice="alloy", input=FIRST.strip(), response_format="pcm") as response:
            async for _ in response.iter_bytes():
                first = first or time.perf_counter() - started
        return first

    async def stop(self) -> None:
        await self.client.close()


class TimedQueue(asyncio.Queue):
    """A reply's queue noting when the client's reader put its first audio in (read off the socket)."""

    def put_nowait(self, item) -> None:
        if isinstance(item, bytes) and not hasattr(self, "read"):
            self.read = time.perf_counter()
        super().put_nowait(item)


class TimedClient(CSMClient):
    """``CSMClient`` noting when the service sent a reply's ``synthesize`` (and its first audio's reading)."""

    async def send(self, message: dict | bytes) -> None:
        if isinstance(message, dict) and message.get("type") == "synthesize":
            self.sent, self.queue = time.perf_counter(), TimedQueue()
            self.replies[message["request_id"]].events = self.queue
        await super().send(message)


class Probe(FrameProcessor):
    """Passes every frame on at once (direct mode: no queue of its own), noting when the first sentence's text
    went into the service (before it) or the first audio and the reply's end came out of it (after it)."""

    def __init__(self) -> None:
        super().__init__(enable_direct_mode=True)
        self.started = asyncio.Event()  # the StartFrame went through: the pipeline runs
        self.reset()

    def reset(self) -> None:
        self.text_at = self.audio_at = None
        self.audio, self.ended = asyncio.Event(), asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            if isinstance(frame, StartFrame):
                self.started.set()
            elif isinstance(frame, LLMTextFrame) and self.text_at is None:
                self.text_at = time.perf_counter()
            elif isinstance(frame, TTSAudioRawFrame) and self.audio_at is None:
                self.audio_at = time.perf_counter()
                self.audio.set()
            elif isinstance(frame, LLMFullResponseEndFrame):
                self.ended.set()
        await self.push_frame(frame, direction)


class InPipeline:
    """A Pipecat TTS service in a pipeline that runs for all the runs (its connection opened once, at start)."""

    def __init__(self, service: FrameProcessor) -> None:
        self.service, self.before, self.after = service, Probe(), Probe()
        self.worker = PipelineWorker(Pipeline([self.before, service, self.after]), cancel_on_idle_timeout=False)
        self.running: asyncio.Task | None = None
        self.split: list[tuple[float, float]] = []  # CSMTTSService: (its own time, the server's) per run

    async def start(self) -> None:
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(self.worker)
        self.running = asyncio.create_task(runner.run())
        await asyncio.wait_for(self.after.started.wait(), 30)

    async def measure(self) -> float:
        self.before.reset()
        self.after.reset()
        await self.worker.queue_frames([LLMFullResponseStartFrame(), LLMTextFrame(FIRST + NEXT_WORD)])
        await asyncio.wait_for(self.after.audio.wait(), 120)
        first = self.after.audio_at - self.before.text_at
        if isinstance(client := getattr(self.service, "client", None), TimedClient):
            sent, read = client.sent, client.queue.read
            self.split.append((sent - self.before.text_at + self.after.audio_at - read, read - sent))
        await self.worker.queue_frames([LLMTextFrame(REST), LLMFullResponseEndFrame()])
        await asyncio.wait_for(self.after.ended.wait(), 120)
        return first

    async def stop(self) -> None:
        await self.worker.queue_frame(EndFrame())
        await asyncio.wait_for(self.running, 30)


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[8]


async def measure_all(port: int, runs: int) -> tuple[dict[str, list[float]], list[tuple[float, float]]]:
    csm = CSMTTSService(url=f"ws://127.0.0.1:{port}", sample_rate=RATE, options=OPTIONS)
    csm.client = TimedClient(csm.client.url)
    openai = OpenAITTSService(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", sample_rate=RATE,
                              settings=OpenAITTSService.Settings(voice="alloy", model="tts-1"))
    paths = {"direct": Direct(port), "service": InPipeline(csm), "openai": InPipeline(openai),
             "sdk": OpenAISDK(port)}
    times: dict[str, list[float]] = {name: [] for name in paths}
    try:
        for path in paths.values():
            await (path.start() if isinstance(path, InPipeline) else asyncio.sleep(0))
            await path.measure()  # warm-up: the connection (HTTP keep-alive for the SDK) is open and used
            await asyncio.sleep(SETTLE_S)
        paths["service"].split.clear()
        for run in range(runs):
            for name in list(paths)[run % len(paths):] + list(paths)[:run % len(paths)]:
                times[name].append(await asyncio.wait_for(paths[name].measure(), 300))
                await asyncio.sleep(SETTLE_S)
    finally:
        for path in paths.values():
            await path.stop()
    return times, paths["service"].split


def report(times: dict[str, list[float]], split: list[tuple[float, float]], engine: str, runs: int) -> None:
    base = median(times["direct"])
    labels = {"direct": "direct WebSocket, text_stream + flush (baseline)",
              "service": "Pipecat CSMTTSService (text frame -> audio frame)",
              "openai": "Pipecat OpenAITTSService on /v1 (text frame -> audio frame)",
              "sdk": "OpenAI SDK alone on /v1, streamed pcm (request -> first bytes)",
              "own": "CSMTTSService's own part: text frame -> sent, read -> audio frame",
              "server": "CSMTTSService's server part: synthesize sent -> first audio read"}
    times = {**times, "own": [s[0] for s in split], "server": [s[1] for s in split]}
    print(f"{machine()}; engine {engine}; {runs} runs each, in turn; first audio after the first sentence's text")
    print(table(["path", "median (ms)", "p90 (ms)", "ratio", "difference (ms)"],
                [[labels[name], median(values) * 1000, p90(values) * 1000,
                  *(["-", "-"] if name == "own" else [median(values) / base, (median(values) - base) * 1000])]
                 for name, values in times.items()]))
    added = median(times["own"]) * 1000
    print(f"\nCSMTTSService adds {added:.2f} ms of its own (median; the difference of the medians above: "
          f"{(median(times['service']) - base) * 1000:.1f} ms): {'under' if added < 5 else 'NOT under'} the 5 ms goal")


def main(runs: int, engine: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        args = ["--engine", "piper"] if engine == "piper" else \
            ["--engine", "csm", "--mode", "reuse", "--model-path", str(build_checkpoint(tmp / "model"))]
        proc, port = start_server(ROOT, [*args, "--cache-mb", "0"], tmp / "work")
        try:
            times, split = asyncio.run(measure_all(port, runs))
        finally:
            stop(proc)
    report(times, split, engine, runs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--engine", choices=["csm", "piper"], default="csm")
    args = parser.parse_args()
    logger.remove()  # Pipecat's debug log, one line per frame and sentence, would drown the table
    logger.add(sys.stderr, level="WARNING")
    main(args.runs, args.engine)
