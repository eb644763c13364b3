"""The remote engine, proven with two real server processes: B speaks with Piper behind its OpenAI API, A runs
``--engines csm,remote,piper`` with its remote pointing at B (as an operator chains a GPU box to a hosted voice)."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import websockets
from openai import OpenAI

from conftest import ServerProcess, collect, http_get

pytestmark = pytest.mark.asyncio(loop_scope="module")
KEY = "b-secret-key-4242"  # B's API key: A must send it, and must never log it
TEXT = "The remote engine speaks this. It has two sentences."


def wait_ready(server: ServerProcess, engine: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited: {server.log_path.read_text()}")
        try:
            status, body = http_get(server.port, "/ready", {"Authorization": f"Bearer {KEY}"})
        except OSError:
            status, body = 0, "{}"
        if status == 200 and json.loads(body)["engine"] == engine:
            wait_loaded(server)  # a fallback must be ready to take over too
            return json.loads(body)
        time.sleep(0.2)
    raise AssertionError(f"{engine} never served: {server.log_path.read_text()}")


def wait_loaded(server: ServerProcess, timeout: float = 120) -> None:
    """Until no engine of ``server``'s chain is still loading (a fallback must be ready to take over)."""
    deadline = time.monotonic() + timeout
    while any(e["state"] == "loading" for e in info(server)["engines"].values()):
        assert time.monotonic() < deadline, server.log_path.read_text()
        time.sleep(0.1)


def info(server: ServerProcess) -> dict:
    status, body = http_get(server.port, "/v1/info", {"Authorization": f"Bearer {KEY}"})
    assert status == 200, body
    return json.loads(body)


def remote_args(b: ServerProcess, *more: str) -> list[str]:
    return ["--remote-url", f"http://127.0.0.1:{b.port}/v1", *more]


@pytest.fixture(scope="module")
def b_and_a(tmp_path_factory, broken_model_dir):
    """B: Piper behind its OpenAI API, with a key.  A: a CSM that cannot load, then the remote (B), then Piper."""
    b = ServerProcess(tmp_path_factory.mktemp("b"), ["--engine", "piper", "--api-key", KEY])
    a = ServerProcess(tmp_path_factory.mktemp("a"),
                      ["--engines", "csm,remote,piper", "--mode", "reuse", "--model-path", str(broken_model_dir),
                       *remote_args(b), "--log-level", "DEBUG", "--engine-cost", "remote=15"],
                      env={"TTS_REMOTE_API_KEY": KEY})
    try:
        wait_ready(b, "piper")
        wait_ready(a, "remote")
        yield b, a
    finally:
        a_log = a.stop()
        b.stop()
        assert KEY not in a_log, "the remote's key reached A's log"


async def speak(server: ServerProcess, **request) -> tuple[dict, bytes, list[dict]]:
    async with websockets.connect(f"ws://127.0.0.1:{server.port}") as ws:
        await ws.send(json.dumps(request))
        return await collect(ws, timeout=120)


async def test_a_broken_csm_hands_requests_to_the_remote_which_answers_with_b_s_audio(b_and_a):
    b, a = b_and_a
    before = info(b)["engines"]["piper"]["stats"]["requests"]
    reply, audio, _ = await speak(a, text=TEXT, format="wav")
    assert reply["status"] == "success" and reply["engine"] == "remote" and reply["voice"] == "alloy"
    assert reply["duration_s"] > 1.0 and len(audio) > 24000
    assert info(b)["engines"]["piper"]["stats"]["requests"] == before + 1  # B's Piper made it (the key was sent)
    engines = info(a)["engines"]
    assert engines["csm"]["state"] == "failed" and [e["position"] for e in engines.values()] == [1, 2, 3]
    stats = engines["remote"]["stats"]
    assert stats["fallbacks"] >= 1 and stats["characters"] >= len(TEXT) and stats["last_used"] > time.time() - 120
    assert stats["estimated_spend_usd"] == pytest.approx(stats["characters"] * 15 / 1e6)
    assert "url" in engines["remote"] and KEY not in json.dumps(info(a))


async def test_audio_streams_through_the_remote_as_b_speaks(b_and_a):
    b, a = b_and_a
    reply, audio, others = await speak(a, text=TEXT, stream=True, engine="remote")
    assert [o["status"] for o in others] == ["start"] and others[0]["engine"] == "remote"
    assert reply["status"] == "success" and reply["chunks"] > 2 and len(audio) == reply["length_bytes"]


async def test_the_openai_sdk_through_a_gets_b_s_voice_and_the_engine_header(b_and_a):
    b, a = b_and_a
    with OpenAI(base_url=f"http://127.0.0.1:{a.port}/v1", api_key="unused", max_retries=0, timeout=60) as client, \
            client.audio.speech.with_streaming_response.create(model="remote", voice="alloy", input=TEXT,
                                                               response_format="pcm") as response:
        assert response.headers["x-tts-engine"] == "remote"
        body = b"".join(response.iter_bytes())
    assert len(body) > 48000 and len(body) % 2 == 0
    metrics = http_get(a.port, "/metrics")[1]
    assert 'tts_engine_fallbacks_total{engine="remote"}' in metrics
    assert 'tts_engine_spend_usd_total{engine="remote"}' in metrics


async def test_a_full_then_stopped_remote_falls_back_to_piper_and_named_requests_get_busy_then_unavailable(
        tmp_path_factory):
    """B allows one request a minute: its 429 is ``busy``; once B is gone, ``model_unavailable``; a request that
    named no engine is answered by Piper both times."""
    b = ServerProcess(tmp_path_factory.mktemp("b2"), ["--engine", "piper", "--rate-limit", "1"])
    a = ServerProcess(tmp_path_factory.mktemp("a2"), ["--engines", "remote,piper", *remote_args(b)])
    try:
        wait_ready(b, "piper")
        wait_ready(a, "remote")
        first, _, _ = await speak(a, text="One.")
        assert first["status"] == "success" and first["engine"] == "remote"
        named, _, _ = await speak(a, text="Two.", engine="remote")
        assert named["status"] == "error" and named["code"] == "busy" and "429" in named["message"]
        fallback, audio, _ = await speak(a, text="Three.")
        assert fallback["status"] == "success" and fallback["engine"] == "piper" and audio
        b.stop()
        named, _, _ = await speak(a, text="Four.", engine="remote")
        assert named["status"] == "error" and named["code"] == "model_unavailable"
        assert f"127.0.0.1:{b.port}" in named["message"]
        fallback, _, _ = await speak(a, text="Five.")
        assert fallback["status"] == "success" and fallback["engine"] == "piper"
        stats = info(a)["engines"]
        assert stats["piper"]["stats"]["fallbacks"] == 2 and stats["remote"]["stats"]["failures"] == 4
    finally:
        a.stop()
        b.stop()


async def test_a_remote_that_never_answers_times_out_into_the_next_engine(tmp_path_factory):
    """A listener that accepts and says nothing: after --remote-timeout the request moves on to Piper."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    a = ServerProcess(tmp_path_factory.mktemp("a3"), ["--engines", "remote,piper", "--remote-timeout", "1",
                                                      "--remote-url", f"http://127.0.0.1:{port}/v1"])
    try:
        wait_ready(a, "remote")
        reply, _, _ = await speak(a, text="Anyone there?")
        assert reply["status"] == "success" and reply["engine"] == "piper"
        named, _, _ = await speak(a, text="Anyone there?", engine="remote")
        assert named["code"] == "model_unavailable" and "did not answer within 1 s" in named["message"]
    finally:
        a.stop()
        silent.close()



async def test_a_remote_at_another_sample_rate_is_resampled_not_sped_up(tmp_path_factory):
    """Our own server at --sample-rate 16000 sends 16 kHz pcm and says so (X-Sample-Rate): A's audio keeps its
    length (read as OpenAI's 24 kHz it would last two thirds as long)."""
    b = ServerProcess(tmp_path_factory.mktemp("b4"), ["--engine", "piper", "--sample-rate", "16000"])
    a = ServerProcess(tmp_path_factory.mktemp("a4"), ["--engines", "remote", *remote_args(b)])
    try:
        wait_ready(b, "piper")
        wait_ready(a, "remote")
        direct, _, _ = await speak(b, text=TEXT)
        through, audio, _ = await speak(a, text=TEXT, format="pcm")
        assert direct["sample_rate"] == 16000 and through["sample_rate"] == 24000
        assert through["duration_s"] == pytest.approx(direct["duration_s"], rel=0.1)
        assert len(audio) == pytest.approx(2 * 24000 * through["duration_s"], abs=4)
    finally:
        a.stop()
        b.stop()


class _Misbehaving:
    """An HTTP server on loopback that answers OpenAI's speech route as a broken remote would: ``html`` (a 200 with
    an error page), ``json`` (a 200 with JSON), or ``forever`` (pcm that never ends)."""

    def __init__(self, mode: str) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers.get("content-length", 0)))
                self.send_response(200)
                if mode == "forever":
                    self.send_header("content-type", "audio/pcm")
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    tone = (np.sin(np.arange(2400) / 5) * 8000).astype("<i2").tobytes()  # 0.1 s at 24 kHz
                    try:
                        for _ in range(10 * 600):  # ten minutes of audio, unless the client hangs up first
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(tone), tone))
                            self.wfile.flush()
                    except OSError:
                        owner.hung_up.set()
                    return
                body = b"<html><body>Bad gateway</body></html>" if mode == "html" else b'{"ok": true}'
                self.send_header("content-type", "text/html" if mode == "html" else "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        owner = self
        self.hung_up = threading.Event()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("mode", ["html", "json"])
async def test_a_remote_answering_with_something_that_is_not_audio_falls_through_to_the_next_engine(mode):
    from conftest import piper_slot, running_server, url
    from tts_server.core.jobs import EngineSlot
    from tts_server.engines.remote import RemoteEngine

    remote = _Misbehaving(mode)
    try:
        async with running_server(EngineSlot(RemoteEngine(remote.url)), piper_slot()) as server:
            async with websockets.connect(url(server)) as ws:
                await ws.send(json.dumps({"text": "Is this audio?"}))
                reply, audio, _ = await collect(ws)
                assert reply["status"] == "success" and reply["engine"] == "piper"
                await ws.send(json.dumps({"text": "Is this audio?", "engine": "remote"}))
                named, _, _ = await collect(ws)
                assert named["code"] == "generation_failed" and "not audio" in named["message"]
    finally:
        remote.close()


async def test_a_remote_that_streams_forever_is_cut_at_the_audio_cap():
    from conftest import running_server, url
    from tts_server.core.jobs import EngineSlot
    from tts_server.engines.remote import RemoteEngine

    remote = _Misbehaving("forever")
    try:
        async with running_server(EngineSlot(RemoteEngine(remote.url))) as server:
            async with websockets.connect(url(server)) as ws:
                await ws.send(json.dumps({"text": "Go on.", "max_audio_length_ms": 1500, "format": "pcm"}))
                reply, audio, _ = await collect(ws)
        assert reply["status"] == "success" and reply["truncated"] is True
        assert len(audio) == 2 * 24000 * 1.5
        # we hung up: the remote's write failed long before its ten minutes (57.6 MB, more than any socket buffer)
        assert await asyncio.to_thread(remote.hung_up.wait, 30)
    finally:
        remote.close()
