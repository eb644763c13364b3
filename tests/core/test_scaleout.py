"""Two server processes behind a real nginx (Debian's package) on loopback, using deploy/nginx.conf."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import websockets

from conftest import ROOT, ServerProcess, collect, free_port, http_get, reply_json

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
if not os.path.exists(NGINX):
    pytestmark = pytest.mark.skip(reason="Debian's nginx is not installed (.ci/run installs it)")


def nginx_config(template: str, listen: int, backends: list[int], prefix) -> str:
    config = template.replace("pid /tmp/tts-nginx.pid;", f"pid {prefix}/nginx.pid;")
    config = config.replace("listen 8080;", f"listen 127.0.0.1:{listen};")
    upstreams = iter(backends)
    config = re.sub(r"server 127\.0\.0\.1:\d+ ", lambda m: f"server 127.0.0.1:{next(upstreams)} ", config)
    return config


def start_nginx(conf, prefix) -> subprocess.Popen:
    """nginx in the foreground, its errors in ``prefix/nginx.stderr``: a file, not a pipe (a pipe nobody reads
    stays open in this process until the garbage collector finds it, and could fill)."""
    with open(prefix / "nginx.stderr", "wb") as errors:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([NGINX, "-c", str(conf), "-p", str(prefix), "-g", "daemon off;"],
                                stdout=subprocess.DEVNULL, stderr=errors)


def served(port: int) -> int:
    return json.loads(http_get(port, "/v1/info")[1])["engines"]["csm"]["stats"]["requests"]


def behind_nginx(tmp_path, tiny_model_dir, *args: str) -> tuple[list[ServerProcess], int, subprocess.Popen]:
    """Two ``run_server.py`` backends (tiny CSM, one thread each: they share the cores) and nginx in front of
    them with deploy/nginx.conf; returns once both serve."""
    backends = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        backends.append(ServerProcess(folder, ["--mode", "reuse", "--model-path", str(tiny_model_dir), "--engine",
                                               "csm", "--trusted-proxies", "127.0.0.1", "--threads", "1", *args]))
    listen = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_config((ROOT / "deploy" / "nginx.conf").read_text(), listen,
                                 [b.port for b in backends], tmp_path))
    proxy = start_nginx(conf, tmp_path)
    try:
        for backend in backends:
            backend.wait_for_log("csm ready")
        time.sleep(0.5)
        assert proxy.poll() is None, (tmp_path / "nginx.stderr").read_text()
    except BaseException:
        proxy.terminate()
        proxy.wait(10)
        for backend in backends:
            backend.stop()
        raise
    return backends, listen, proxy


async def speak(port: int, text: str) -> dict:
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:
        await ws.send(json.dumps({"text": text, "max_audio_length_ms": 240}))
        return (await collect(ws, timeout=60))[0]


async def test_nginx_spreads_load_and_survives_a_draining_backend(tiny_model_dir, tmp_path):
    backends, listen, proxy = behind_nginx(tmp_path, tiny_model_dir, "--shutdown-grace", "60")
    try:
        replies = await asyncio.gather(*(speak(listen, f"Through nginx {i}") for i in range(8)))
        assert all(r["status"] == "success" for r in replies)
        counts = [await asyncio.to_thread(served, b.port) for b in backends]
        assert sum(counts) == 8 and min(counts) > 0, counts  # both backends served

        # In-flight streams, then backend a drains on SIGTERM.
        streams = [await websockets.connect(f"ws://127.0.0.1:{listen}/ws") for _ in range(4)]
        for i, ws in enumerate(streams):
            await ws.send(json.dumps({"text": "A longer streamed answer. " * 4, "stream": True,
                                      "max_audio_length_ms": 4000, "request_id": f"s{i}"}))
        backends[0].proc.send_signal(signal.SIGTERM)
        outcomes = []
        for i, ws in enumerate(streams):
            try:
                reply, _, _ = await collect(ws, f"s{i}", timeout=60)  # never a hang: bounded wait
                outcomes.append(reply["status"] if reply["status"] != "error" else reply["code"])
            except websockets.ConnectionClosed as closed:
                outcomes.append(f"closed {closed.rcvd.code if closed.rcvd else None}")
            await ws.close()
        assert all(o in ("success", "shutting_down") or o.startswith("closed 100") for o in outcomes), outcomes
        assert await asyncio.to_thread(backends[0].proc.wait, 60) == 0

        after = await asyncio.gather(*(speak(listen, f"After the drain {i}") for i in range(4)))
        assert all(r["status"] == "success" for r in after)
    finally:
        proxy.terminate()
        proxy.wait(10)
        for backend in backends:
            backend.stop()


async def connect_from(port: int, address: str, **options):
    """A WebSocket to nginx from a loopback source ``address`` (all of 127.0.0.0/8 is this machine)."""
    return await websockets.connect(f"ws://127.0.0.1:{port}/ws", local_addr=(address, 0), **options)


async def test_through_nginx_the_page_works_and_limits_count_each_client_not_nginx(tiny_model_dir, tmp_path):
    backend = ServerProcess(tmp_path, ["--mode", "reuse", "--model-path", str(tiny_model_dir), "--engine", "csm",
                                       "--trusted-proxies", "127.0.0.1", "--max-connections-per-address", "16"])
    listen = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_config((ROOT / "deploy" / "nginx.conf").read_text(), listen, [backend.port] * 2, tmp_path))
    proxy = start_nginx(conf, tmp_path)
    opened = []
    try:
        backend.wait_for_log("csm ready")
        time.sleep(0.5)
        assert proxy.poll() is None, (tmp_path / "nginx.stderr").read_text()
        status, page = await asyncio.to_thread(http_get, listen, "/")
        assert status == 200 and "<html" in page.lower()
        # The page's own WebSocket: its Origin is nginx's address and port, which the backend must see as its own.
        async with websockets.connect(f"ws://127.0.0.1:{listen}/ws", origin=f"http://127.0.0.1:{listen}") as ws:
            await ws.send(json.dumps({"text": "From the page", "max_audio_length_ms": 160}))
            assert (await collect(ws, timeout=60))[0]["status"] == "success"

        # 24 clients, one connection each: all admitted although nginx alone connects to the backend.
        for n in range(24):
            opened.append(await connect_from(listen, f"127.0.0.{10 + n}"))
        for ws in opened:
            await ws.send(json.dumps({"type": "reset"}))
            assert reply_json(await asyncio.wait_for(ws.recv(), 30)) == {"status": "reset"}

        # One client's 17th connection is refused, and a forged X-Forwarded-For does not dodge the limit.
        same = [await connect_from(listen, "127.0.0.5", additional_headers={"X-Forwarded-For": f"10.9.9.{n}"})
                for n in range(17)]
        opened += same
        for ws in same[:16]:
            await ws.send(json.dumps({"type": "reset"}))
            assert reply_json(await asyncio.wait_for(ws.recv(), 30)) == {"status": "reset"}
        refused = reply_json(await asyncio.wait_for(same[16].recv(), 30))
        assert refused["code"] == "too_many_connections"
    finally:
        for ws in opened:
            await ws.close()
        proxy.terminate()
        proxy.wait(10)
        backend.stop()


async def test_a_session_resumes_on_the_other_replica_when_its_server_goes_away(tiny_model_dir, tmp_path, redis_url):
    """Two servers sharing a Redis session store behind nginx: the client's server stops, its reconnection lands
    on the other one, which resumes the session with every acknowledged turn and carries on."""
    from audio_fixtures import audio_bytes, speechlike
    from conftest import recv_json

    backends, listen, proxy = behind_nginx(tmp_path, tiny_model_dir, "--session-store", redis_url)
    try:
        async with websockets.connect(f"ws://127.0.0.1:{listen}/ws") as ws:
            await ws.send(json.dumps({"type": "session"}))
            session = (await recv_json(ws))["session"]
            await ws.send(json.dumps({"type": "turn", "speaker": 1, "text": "Hello there."}))
            await ws.send(audio_bytes(speechlike(1.5)))
            assert (await recv_json(ws))["status"] == "turn_saved"
            await ws.send(json.dumps({"text": "Hello to you.", "max_audio_length_ms": 240}))
            assert (await collect(ws, timeout=60))[0]["status"] == "success"
            counts = [await asyncio.to_thread(served, b.port) for b in backends]
        serving = backends[counts.index(1)]
        serving.proc.send_signal(signal.SIGTERM)  # the client's server goes away
        assert await asyncio.to_thread(serving.proc.wait, 60) == 0
        async with websockets.connect(f"ws://127.0.0.1:{listen}/ws?session={session}") as ws:
            resumed = await recv_json(ws)
            await ws.send(json.dumps({"text": "And here I am again.", "max_audio_length_ms": 240}))
            again = (await collect(ws, timeout=60))[0]
        survivor = backends[1 - counts.index(1)]
        status, listed = await asyncio.to_thread(http_get, survivor.port, f"/v1/sessions/{session}")
    finally:
        proxy.terminate()
        proxy.wait(10)
        for backend in backends:
            backend.stop()
    assert sorted(counts) == [0, 1]
    assert resumed == {"status": "session", "session": session, "turns": 2} and again["status"] == "success"
    assert status == 200 and [t["text"] for t in json.loads(listed)["turns"]] == [
        "Hello there.", "Hello to you.", "And here I am again."]
