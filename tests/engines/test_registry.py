"""The engine registry: every layer reads it, so a new engine is one module plus one ``register`` call.

The toy engine below (a sine tone) lives only in this test: registered, it is
built from the settings, listed in ``/v1/info``, OpenAI's ``/v1/models`` and
Wyoming's ``describe``, and answers requests that name it on the WebSocket and
through the OpenAI SDK, with no file of ``tts_server`` naming it.
"""

from __future__ import annotations

import ast
import asyncio
import json
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import websockets
from openai import OpenAI
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe, Info

from conftest import ROOT, ahttp_get, collect, free_port
from tts_server.app import build_server
from tts_server.engines import registry
from tts_server.engines.base import Engine, SentenceMark
from tts_server.settings import load_settings

BUILT_IN = ("csm", "piper", "remote")


class SineEngine(Engine):
    """A 440 Hz tone, a quarter second per word, at 16 kHz (so the core resamples it like any engine's)."""

    name = "sine"
    sample_rate = 16000
    words = "a tone has no words"

    def __init__(self, hertz: float) -> None:
        self.hertz = hertz

    def load(self) -> None:
        pass

    def describe(self) -> dict:
        return {"voice": f"{self.hertz:g} Hz", "model": "sine", "sample_rate": self.sample_rate, "languages": ["en"]}

    def languages(self) -> tuple[str, ...]:
        return ("en",)

    def synthesize(self, task):
        for text in task.texts():
            samples = int(0.25 * self.sample_rate * len(text.split()))
            yield (0.3 * np.sin(2 * np.pi * self.hertz * np.arange(samples) / self.sample_rate)).astype(np.float32)
            yield SentenceMark(text)


@pytest.fixture
def sine_registered():
    spec = registry.register(registry.EngineSpec(
        "sine", lambda settings: SineEngine(440.0), label="Sine", description="a test tone",
        attribution=("Tests", "https://example.org/sine"), aliases=("sine-1",),
        capabilities=registry.Capabilities(seedable=False, voices=registry.VoiceListing.SINGLE)))
    try:
        yield spec
    finally:
        registry.unregister("sine")


async def test_a_registered_toy_engine_is_listed_and_answers_on_every_interface(sine_registered, tmp_path):
    wyoming_port = free_port()
    settings = load_settings(["--engines", "sine", "--host", "127.0.0.1", "--port", "0", "--session-store", "memory",
                              "--wyoming-uri", f"tcp://127.0.0.1:{wyoming_port}", "--engine-cost", "sine=1"],
                             environ={}, dotenv_path=None)
    server = build_server(settings)
    await server.start()
    try:
        await asyncio.wait_for(server.service.scheduler.primary.loaded.wait(), 30)
        info = json.loads((await ahttp_get(server.port, "/v1/info"))[1])
        assert info["engines"]["sine"]["state"] == "ready" and info["engines"]["sine"]["label"] == "Sine"
        assert info["engines"]["sine"]["capabilities"]["voices"] == "single"

        listed = {m["id"]: m["owned_by"] for m in json.loads((await ahttp_get(server.port, "/v1/models"))[1])["data"]}
        assert listed["sine"] == listed["sine-1"] == listed["tts-1"] == "csm-tts-server:sine"

        def speak(model: str) -> bytes:
            with OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0, timeout=30) as c:
                return c.audio.speech.create(model=model, voice="alloy", input="Two words",
                                             response_format="pcm").content

        pcm = await asyncio.to_thread(speak, "sine-1")
        assert len(pcm) // 2 == pytest.approx(0.5 * 24000, abs=480)  # two words, resampled to 24 kHz

        async with websockets.connect(f"ws://127.0.0.1:{server.port}") as ws:
            await ws.send(json.dumps({"type": "synthesize", "text": "Three whole words", "engine": "sine",
                                      "request_id": "toy"}))
            reply, audio, _ = await collect(ws, "toy")
        assert reply["status"] == "success" and reply["engine"] == "sine" and audio[:4] == b"RIFF"

        async with AsyncTcpClient("127.0.0.1", urlparse(server.wyoming.uri).port) as client:
            await client.write_event(Describe().event())
            described = Info.from_event(await asyncio.wait_for(client.read_event(), 30))
        program, = described.tts
        assert (program.name, program.description, program.attribution.name) == ("sine", "a test tone", "Tests")
        assert [v.name for v in program.voices] == ["sine"] and program.voices[0].languages == ["en"]
    finally:
        await server.stop()


def test_settings_take_a_registered_engine_and_refuse_it_once_unregistered(capsys):
    def settings(*argv: str):
        return load_settings(["--engines", "piper,sine", "--overflow-engine", "sine", "--engine-cost", "sine=2",
                              *argv], environ={}, dotenv_path=None)

    spec = registry.register(registry.EngineSpec("sine", lambda s: SineEngine(220.0)))
    try:
        assert settings().chain() == ["piper", "sine"] and settings().costs() == {"sine": 2.0}
        with pytest.raises(ValueError, match="already registered"):
            registry.register(spec)
    finally:
        registry.unregister("sine")
    with pytest.raises(SystemExit):
        settings()
    assert "list engines from csm, piper, remote" in capsys.readouterr().err


def test_the_built_in_entries_say_what_their_engines_do():
    from tts_server.engines.csm import CsmEngine
    from tts_server.engines.piper import PiperEngine
    from tts_server.engines.remote import RemoteEngine

    assert registry.names()[:3] == BUILT_IN
    for name, cls in zip(BUILT_IN, (CsmEngine, PiperEngine, RemoteEngine)):
        said = registry.capabilities(name)
        assert cls.name == name
        assert (said.seedable, said.native_speed) == (cls.seedable, cls.native_speed), name
    assert [s.name for s in registry.specs() if s.capabilities.encodes_turns] == ["csm"]


def _string_constants(tree: ast.AST) -> list[ast.Constant]:
    """Every string constant of ``tree`` except docstrings."""
    docstrings = {id(body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and (body := node.body) and isinstance(body[0], ast.Expr)
                  and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)}
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


@pytest.mark.parametrize("layer", ["api", "core"])
def test_the_interfaces_and_the_core_name_no_engine(layer):
    found = []
    for path in sorted((ROOT / "tts_server" / layer).rglob("*.py")):
        for node in _string_constants(ast.parse(path.read_text(), str(path))):
            if node.value in BUILT_IN:
                found.append(f"{Path(path).relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert found == []
