"""``run_server.py`` as a user runs it: flags, environment, model paths, secrets."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import websockets

from conftest import ROOT, ServerProcess, ahttp_get, collect, free_port
from tts_server.settings import load_settings
from tts_server.engines.model_source import ModelSourceError, resolve_local

SECRET = "hf_TopSecretTokenValue1234567890"


async def speak(port: int, payload: dict) -> tuple[dict, bytes]:
    async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
        await ws.send(json.dumps(payload))
        reply, audio, _ = await collect(ws)
    return reply, audio


def hub_cache_copy(model_dir: Path, root: Path) -> Path:
    """Lay ``model_dir`` out as the hub cache does: models--org--name/snapshots/<rev> + refs/main."""
    repo = root / "hub" / "models--sesame--csm-1b"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return repo


async def test_reuse_mode_accepts_a_hub_cache_folder(tiny_model_dir, tmp_path):
    repo = hub_cache_copy(tiny_model_dir, tmp_path)
    server = ServerProcess(tmp_path, ["--mode", "reuse", "--model-path", str(repo)])
    try:
        server.wait_for_log("csm ready")
        reply, audio = await speak(server.port, {"text": "From the cache", "max_audio_length_ms": 240})
        assert reply["status"] == "success" and audio[:4] == b"RIFF"
    finally:
        log = server.stop()
    assert str(repo / "snapshots" / "0123abcd") in log
    assert server.proc.returncode == 0


def test_resolve_local_picks_the_snapshot_named_by_refs_main(tiny_model_dir, tmp_path):
    repo = hub_cache_copy(tiny_model_dir, tmp_path)
    (repo / "snapshots" / "older").mkdir()
    assert resolve_local(repo) == repo / "snapshots" / "0123abcd"
    assert resolve_local(tiny_model_dir) == tiny_model_dir


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_bad_model_path_is_a_startup_error_naming_the_path(tmp_path, make):
    path = tmp_path / "model"
    if make == "empty":
        path.mkdir()
    elif make == "file":
        path.write_text("not a folder")
    with pytest.raises(ModelSourceError, match=str(path)):
        resolve_local(path)
    proc = subprocess.run([sys.executable, str(ROOT / "run_server.py"), "--mode", "reuse", "--model-path", str(path),
                           "--port", str(free_port())], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert str(path) in proc.stderr and "Traceback" not in proc.stderr


def test_flags_win_over_environment_which_wins_over_dotenv(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("TTS_PORT=1111\nTTS_MAX_QUEUE=7\nTTS_DEVICE=cpu\nHF_TOKEN=from-dotenv\n")
    env = {"TTS_PORT": "2222", "TTS_MODE": "reuse"}
    settings = load_settings(["--port", "3333"], environ=env, dotenv_path=dotenv)
    assert settings.port == 3333 and settings.mode == "reuse"
    settings = load_settings([], environ=env, dotenv_path=dotenv)
    assert settings.port == 2222 and settings.max_queue == 7 and settings.device == "cpu"
    assert settings.hf_token == "from-dotenv" and "from-dotenv" not in repr(settings)
    settings = load_settings([], environ={}, dotenv_path=None)
    assert (settings.port, settings.mode, settings.model_id, settings.max_queue) == (8765, "download", "sesame/csm-1b", 32)


def test_bad_environment_value_is_a_clear_usage_error(tmp_path):
    with pytest.raises(SystemExit):
        load_settings([], environ={"TTS_PORT": "eighty"}, dotenv_path=None)
    with pytest.raises(SystemExit):
        load_settings([], environ={"TTS_DEVICE": "tpu"}, dotenv_path=None)
    with pytest.raises(SystemExit):
        load_settings(["--threads", "-1"], environ={}, dotenv_path=None)
    assert load_settings([], environ={"TTS_THREADS": "3"}, dotenv_path=None).threads == 3


async def test_environment_configures_the_process_and_a_flag_overrides_it(tiny_model_dir, tmp_path):
    port = free_port()
    env = {"TTS_MODE": "reuse", "TTS_MODEL_PATH": str(tiny_model_dir), "TTS_PORT": "1", "TTS_MAX_TEXT_CHARS": "10"}
    server = ServerProcess(tmp_path, ["--port", str(port)], env)
    try:
        server.wait_for_log("csm ready")
        reply, _ = await speak(port, {"text": "this is longer than ten"})
        assert reply["code"] == "text_too_long"
        info = json.loads((await ahttp_get(port, "/v1/info"))[1])
        assert info["engines"]["csm"]["max_batch"] == 4  # auto on a CPU
    finally:
        server.stop()


async def test_download_without_network_reports_unavailable_and_never_logs_the_token(tmp_path):
    env = {"HF_TOKEN": SECRET, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
           "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    server = ServerProcess(tmp_path, ["--mode", "download", "--engine", "csm", "--log-level", "DEBUG"], env)
    try:
        server.wait_for_log("csm unavailable")
        reply, _ = await speak(server.port, {"text": "Anyone there?"})
        assert reply["code"] == "model_unavailable"
        assert "no network" in reply["message"] and SECRET not in json.dumps(reply)
        for path in ("/v1/info", "/metrics", "/ready"):
            body = (await ahttp_get(server.port, path))[1]
            assert SECRET not in body and len(body) > 20, path
    finally:
        log = server.stop()
    assert "no network to download sesame/csm-1b" in log
    assert SECRET not in log


async def test_fresh_machine_defaults_speak_with_piper_and_say_why_csm_is_unavailable(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
           "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    server = ServerProcess(tmp_path, [], env)
    try:
        server.wait_for_log("serving with Piper")
        reply, audio = await speak(server.port, {"text": "Hello from a fresh machine."})
        info = json.loads((await ahttp_get(server.port, "/v1/info"))[1])
    finally:
        log = server.stop()
    assert reply["status"] == "success" and reply["engine"] == "piper" and len(audio) > 24000
    reason = info["serving"]["reason"]
    assert reason.startswith("CSM-1B unavailable: no network to download sesame/csm-1b")
    assert reason.endswith("serving with Piper en_US-joe-medium")
    assert "CSM-1B unavailable: no network" in log



def test_every_option_is_documented_in_the_readme_and_the_env_template():
    from tts_server.settings import OPTIONS

    readme, template = (ROOT / "README.md").read_text(), (ROOT / ".env.template").read_text()
    assert [o.flag for o in OPTIONS if f"| `{o.flag}` | `{o.env}` |" not in readme] == []
    assert [o.env for o in OPTIONS if f"\n{o.env}=" not in template] == []


def test_wyoming_options_are_checked_at_startup():
    for argv in (["--wyoming-uri", "http://0.0.0.0:10200"], ["--wyoming-uri", "tcp://0.0.0.0"],
                 ["--wyoming-zeroconf"], ["--wyoming-uri", "unix:///tmp/x.sock", "--wyoming-zeroconf", "x"]):
        with pytest.raises(SystemExit):
            load_settings(argv, environ={}, dotenv_path=None)
    settings = load_settings(["--wyoming-uri", "tcp://0.0.0.0:10200", "--wyoming-zeroconf"], environ={},
                             dotenv_path=None)
    assert (settings.wyoming_uri, settings.wyoming_zeroconf) == ("tcp://0.0.0.0:10200", "csm-tts")


def test_turn_taking_options_are_checked_at_startup():
    for argv in (["--stt-language", "zz"], ["--stt-language", "EN"], ["--turn-detector", "silence"],
                 ["--turn-max-silence-ms", "0"]):
        with pytest.raises(SystemExit):
            load_settings(argv, environ={}, dotenv_path=None)
    settings = load_settings(["--stt-language", "de", "--turn-detector", "vad"], environ={}, dotenv_path=None)
    assert (settings.stt_language, settings.turn_detector, settings.vad_silence_ms) == ("de", "vad", None)
