"""``pip install .`` (issue 30, item 4): the wheel holds the server, its page and the integrations, installs a
``csm-tts-server`` command that is ``python run_server.py``, and names the frameworks only as extras."""

from __future__ import annotations

import email
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_installs_a_csm_tts_server_command_with_the_framework_extras(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
                   check=True, timeout=300)
    wheel = next(tmp_path.glob("csm_tts_server-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        meta = email.message_from_bytes(archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
        entry = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert {"tts_server/app.py", "tts_server/static/talk.js", "tts_server/integrations/pipecat.py",
            "tts_server/integrations/livekit.py"} <= names
    assert "csm-tts-server = tts_server.app:main" in entry
    requires = meta.get_all("Requires-Dist")
    runtime = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert {_same(r) for r in requires if "extra ==" not in r} == {_same(r) for r in runtime if r}  # its own
    assert any(r.startswith("livekit-agents==") and 'extra == "livekit"' in r for r in requires)
    assert any(r.startswith("pipecat-ai==") and 'extra == "pipecat"' in r for r in requires)
    assert {"pipecat", "livekit"} <= set(meta.get_all("Provides-Extra"))

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    helped = subprocess.run([sys.executable, str(target / "bin" / "csm-tts-server"), "--help"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    checkout = subprocess.run([sys.executable, str(ROOT / "run_server.py"), "--help"], capture_output=True,
                              text=True, timeout=120)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: csm-tts-server")
    options = re.compile(r"^  (--[a-z][a-z-]*)", re.M)  # (the defaults may differ: the references folder)
    assert options.findall(helped.stdout) == options.findall(checkout.stdout) != []  # the same options


def _same(requirement: str) -> tuple[str, frozenset]:
    from packaging.requirements import Requirement

    parsed = Requirement(requirement)
    return parsed.name.lower(), frozenset(str(spec) for spec in parsed.specifier)
