"""The WebSocket fuzzer's rate, for ``interfaces.py --against``: bad frames answered per second on one connection.

A fixed, seeded mix of the kinds of hostile frame ``tests/api/test_fuzz.py``
sends (not JSON, wrong types, unknown types, oversized fields, a binary frame
where a request belongs, ...), chosen so that each is answered by exactly one
error reply and none reaches an engine: the rate measures the path every bad
frame takes (parse, validate, refuse, encode, send), not synthesis.  The
client sends one frame, awaits its reply, and sends the next.
"""

from __future__ import annotations

import json
import random
import time

import websockets

SEED = 20261122  # the fuzz test's seed
KINDS: dict[str, str | bytes] = {
    "not JSON": "{not json",
    "JSON, not an object": "[1, 2, 3]",
    "unknown type": json.dumps({"type": "dance"}),
    "type not a string": json.dumps({"type": 7, "text": "hi"}),
    "text of the wrong type": json.dumps({"text": 42}),
    "text too long (oversized field)": json.dumps({"text": "x" * 4001}),  # --max-text-chars defaults to 4000
    "speaker out of range": json.dumps({"text": "hi", "speaker": -3}),
    "temperature of the wrong type": json.dumps({"text": "hi", "temperature": "hot"}),
    "unknown format": json.dumps({"text": "hi", "format": "aiff"}),
    "cancel of an unknown request": json.dumps({"type": "cancel", "request_id": "nobody"}),
    "binary frame where a request belongs": b"\x00\x01\x02\x03",
}


def mix(count: int) -> list[str | bytes]:
    """The same ``count`` frames, in the same order, for every server measured."""
    choose = random.Random(SEED)
    frames = list(KINDS.values())
    return [choose.choice(frames) for _ in range(count)]


async def check(port: int) -> None:
    """Each kind, followed by a ``reset``: exactly one reply, an error, comes before the reset's.  Run on every
    server before it is timed, so that a rate is never of frames answered some other way."""
    async with websockets.connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
        for name, frame in KINDS.items():
            await ws.send(frame)
            await ws.send(json.dumps({"type": "reset"}))
            replies = []
            while (reply := json.loads(await ws.recv())) != {"status": "reset"}:
                replies.append(reply)
            if [reply.get("status") for reply in replies] != ["error"]:
                raise AssertionError(f"port {port}: {name!r} was answered {replies}, not by one error")


async def rate(port: int, frames: list[str | bytes]) -> float:
    """Frames answered per second: send one, await its reply, repeat, on one connection."""
    async with websockets.connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
        started = time.perf_counter()
        for frame in frames:
            await ws.send(frame)
            await ws.recv()
        return len(frames) / (time.perf_counter() - started)
