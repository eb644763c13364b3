"""``run_server.py`` of this tree or of another git revision, as a child process on a free loopback port: for the
benchmarks' ``--against REV`` comparisons (both servers measured in one run, in turn)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(root: Path, args: list[str], work: Path) -> tuple[subprocess.Popen, int]:
    """``run_server.py`` of the tree at ``root`` with ``args`` (and an empty reference library), run in ``work``;
    returns once ``/ready`` says it serves."""
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    (work / "references").mkdir(exist_ok=True)
    (work / "references" / "emotion_map.json").write_text("{}")
    proc = subprocess.Popen([sys.executable, str(root / "run_server.py"), "--host", "127.0.0.1", "--port", str(port),
                             "--references", str(work / "references"), *args], cwd=work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as answer:
                if answer.status == 200:
                    return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server of {root} did not become ready")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextlib.contextmanager
def checkout(revision: str, where: Path) -> Iterator[Path]:
    """The tree of ``revision`` in a temporary git worktree at ``where``."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), revision], check=True,
                   capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], capture_output=True)
