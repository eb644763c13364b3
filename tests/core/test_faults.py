"""Faults: disconnects at every phase, hung and failing engines, out-of-memory, SIGTERM -- nothing lost."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import pytest
import torch
import websockets

from conftest import ServerProcess, collect, csm_slot, recv_json, running_server, url
from tts_server.engines.csm import CsmEngine
from tts_server.core.jobs import EngineSlot

LONG = {"text": "A long answer that keeps going. " * 10, "stream": True, "max_audio_length_ms": 60_000}


async def settle(server, timeout: float = 20) -> None:
    """Wait until the worker is idle and no connection holds a job."""
    deadline = time.monotonic() + timeout
    while server.service.scheduler.running or server.service.scheduler.depth or any(c.live for c in server.connections):
        assert time.monotonic() < deadline, "server did not settle"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("phase, max_batch", [("queued", 1), ("prefill", 1), ("mid-stream", 1), ("after-last-chunk", 1),
                                              ("prefill", 4), ("mid-stream", 4), ("after-last-chunk", 4)])
async def test_disconnect_at_any_phase_frees_capacity_and_leaks_nothing(tiny_model_dir, phase, max_batch):
    async with running_server(csm_slot(tiny_model_dir, max_batch=max_batch)) as server:
        async with websockets.connect(url(server)) as warm:  # start the worker thread once
            await warm.send(json.dumps({"text": "Warm up", "max_audio_length_ms": 160}))
            await collect(warm)
        await settle(server)
        await asyncio.sleep(0.2)
        threads, tasks = threading.active_count(), len(asyncio.all_tasks())
        blocker = None
        if phase == "queued":  # a long request from someone else keeps ours waiting
            blocker = await websockets.connect(url(server))
            await blocker.send(json.dumps(LONG))
            assert (await recv_json(blocker))["status"] == "start"
        ws = await websockets.connect(url(server))
        short = {"stream": True, "max_audio_length_ms": 480} if phase == "after-last-chunk" else {}
        await ws.send(json.dumps({**LONG, **short, "request_id": "leaver"}))
        if phase == "prefill":
            while not server.service.scheduler.running:
                await asyncio.sleep(0)
        elif phase == "mid-stream":
            assert (await recv_json(ws))["status"] == "start"
            assert isinstance(await ws.recv(), bytes)
        elif phase == "after-last-chunk":
            assert (await collect(ws, "leaver"))[0]["status"] == "success"
        await ws.close()
        if blocker is not None:
            await blocker.close()
        await settle(server)
        async with websockets.connect(url(server)) as other:  # capacity is free for the next client
            await other.send(json.dumps({"text": "Next client", "max_audio_length_ms": 160}))
            assert (await collect(other))[0]["status"] == "success"
        await settle(server)
        deadline = time.monotonic() + 10  # closing handshakes may still be winding down
        while (threading.active_count() > threads or len(asyncio.all_tasks()) > tasks) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert threading.active_count() <= threads
        assert len(asyncio.all_tasks()) <= tasks
        cancelled = server.service.metrics.requests.labels("csm", "cancelled")._value.get()
        # The leaver was cancelled mid-work; a leaver that never started is not counted, but its blocker is.
        assert cancelled == (0 if phase == "after-last-chunk" else 1)
        assert server.service.metrics.stats["csm"].requests == 3
        batcher = server.service.scheduler.primary.engine.batcher
        assert batcher is None or (batcher.active == {} and sorted(batcher._free) == [0, 1, 2, 3])


class FlakyCsm(CsmEngine):
    """The real tiny CSM, whose first request hangs (blocks without audio) or raises an OOM error."""

    def __init__(self, folder, fault: str) -> None:
        super().__init__(lambda: folder, device="cpu")
        self.fault, self.fired = fault, False

    def synthesize(self, task):
        if not self.fired:
            self.fired = True
            if self.fault == "hang":
                time.sleep(3)  # stuck in native code, deaf to cancellation
            else:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        yield from super().synthesize(task)


async def test_hung_engine_times_out_and_a_fresh_worker_serves_the_next_request(tiny_model_dir):
    slot = EngineSlot(FlakyCsm(tiny_model_dir, "hang"))
    async with running_server(slot, generation_timeout=1) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"text": "Hang", "request_id": "stuck"}))
            reply, _, _ = await collect(ws, "stuck")
            await ws.send(json.dumps({"text": "Recovered", "max_audio_length_ms": 160}))
            after, audio, _ = await collect(ws)
    assert reply["code"] == "generation_timeout" and reply["request_id"] == "stuck"
    assert after["status"] == "success" and audio


async def test_out_of_memory_fails_that_request_clearly_and_the_server_lives(tiny_model_dir):
    async with running_server(EngineSlot(FlakyCsm(tiny_model_dir, "oom"))) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"text": "Too big"}))
            reply, _, _ = await collect(ws)
            await ws.send(json.dumps({"text": "Fits", "max_audio_length_ms": 160}))
            after, _, _ = await collect(ws)
    assert reply["code"] == "generation_failed" and "out of memory" in reply["message"]
    assert after["status"] == "success"


async def test_sigterm_drains_the_running_request_refuses_the_queue_and_exits_0(tiny_model_dir, tmp_path):
    # one running, one queued; the grace is far longer than the running request needs on any machine, however
    # loaded (at the default 30 s a loaded CI host cancelled it: a race with the clock, not a drain failure)
    server = ServerProcess(tmp_path, ["--mode", "reuse", "--model-path", str(tiny_model_dir), "--engine", "csm",
                                      "--max-batch", "1", "--shutdown-grace", "240"])
    try:
        server.wait_for_log("csm ready")
        running = await websockets.connect(f"ws://127.0.0.1:{server.port}")
        waiting = await websockets.connect(f"ws://127.0.0.1:{server.port}")
        await running.send(json.dumps({"text": "Finish me please. " * 4, "stream": True,
                                       "max_audio_length_ms": 6000, "request_id": "run"}))
        assert (await recv_json(running))["status"] == "start"
        await waiting.send(json.dumps({"text": "I am queued", "request_id": "wait"}))
        await asyncio.sleep(0.2)
        server.proc.send_signal(signal.SIGTERM)
        done, audio, _ = await collect(running, "run")
        refused, _, _ = await collect(waiting, "wait")
        await asyncio.wait_for(running.wait_closed(), 30)
        assert await asyncio.to_thread(server.proc.wait, 60) == 0
    finally:
        log = server.stop()
    assert done["status"] == "success" and len(audio) == done["length_bytes"] > 0
    assert refused["code"] == "shutting_down"
    assert running.close_code == 1001
    with pytest.raises(OSError):
        await websockets.connect(f"ws://127.0.0.1:{server.port}", open_timeout=5)
    assert "Shutting down: 1 queued requests refused" in log
