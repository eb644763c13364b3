"""A session store that stalls or goes away (a real redis-server, stopped with SIGSTOP and restarted): every
session call is a prompt ``store_unavailable`` (HTTP 503 in OpenAI's shape), said before any audio is made, and the
store is used again once it is back, without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time

import pytest
import websockets
from openai import APIStatusError, OpenAI

from audio_fixtures import audio_bytes, speechlike
from conftest import ahttp_get, csm_slot, free_port, read_until, recv_json, running_server, url

TERMINAL = {"success", "error", "cancelled"}


class Redis:
    """A redis-server of this test's own (appendonly: a restart keeps the sessions)."""

    def __init__(self, folder) -> None:
        self.port, self.folder = free_port(), folder
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("Debian's redis-server is not installed (.ci/run installs it)")
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.folder)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        self.proc.wait(10)


async def speak(ws, request_id: str) -> tuple[dict, bytes]:
    await ws.send(json.dumps({"text": "Hello there.", "seed": 3, "speaker": 0, "max_audio_length_ms": 400,
                              "format": "pcm", "request_id": request_id}))
    final, audio, _ = await read_until(ws, lambda r: r.get("status") in TERMINAL and r.get("request_id") == request_id)
    return final, audio


async def test_a_stalled_or_restarted_redis_is_store_unavailable_and_is_used_again_once_back(tiny_model_dir,
                                                                                             tmp_path):
    redis = Redis(tmp_path)
    try:
        async with running_server(csm_slot(tiny_model_dir), session_store=redis.url) as server:
            openai = OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="-", max_retries=0, timeout=60)
            async with websockets.connect(url(server)) as ws, asyncio.timeout(120):
                await ws.send(json.dumps({"type": "session"}))
                session = (await recv_json(ws))["session"]
                await ws.send(json.dumps({"type": "turn", "speaker": 1, "text": "Before the outage."}))
                await ws.send(audio_bytes(speechlike(1.0, seed=1)))
                assert (await recv_json(ws))["status"] == "turn_saved"
                redis.proc.send_signal(signal.SIGSTOP)
                try:
                    stalled, body = await ahttp_get(server.port, f"/v1/sessions/{session}")
                    refused, audio = await speak(ws, "during")
                    with pytest.raises(APIStatusError) as speech:
                        await asyncio.to_thread(lambda: openai.audio.speech.create(
                            model="csm", voice="alloy", input="Hi.", extra_body={"session": session}))
                finally:
                    redis.proc.send_signal(signal.SIGCONT)
                resumed, resumed_body = await ahttp_get(server.port, f"/v1/sessions/{session}")
                redis.stop()
                gone, _ = await ahttp_get(server.port, f"/v1/sessions/{session}")
                redis.start()
                back, back_body = await ahttp_get(server.port, f"/v1/sessions/{session}")
                spoken, _ = await speak(ws, "after")
            openai.close()
    finally:
        redis.stop()
    assert stalled == 503 and json.loads(body)["error"]["code"] == "store_unavailable"
    assert refused["code"] == "store_unavailable" and audio == b""  # said before any audio was made
    assert speech.value.status_code == 503 and speech.value.body["code"] == "store_unavailable"
    assert gone == 503
    for status, turns in ((resumed, resumed_body), (back, back_body)):
        assert status == 200 and [t["text"] for t in json.loads(turns)["turns"]] == ["Before the outage."]
    assert spoken["status"] == "success"
