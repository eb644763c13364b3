"""Plain HTTP GET endpoints served on the WebSocket port (via ``process_request``).

``/health`` says the process is alive; ``/ready`` says whether a request without
an ``engine`` field would be answered now (load balancers route on it);
``/metrics`` is Prometheus text; ``/v1/info`` describes engines, formats and
limits for clients and the browser page; ``/`` and ``/static/*`` serve that page.
"""

from __future__ import annotations

import http
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from websockets.datastructures import Headers
from websockets.http11 import Response

from . import openai_protocol as o
from . import protocol as p

if TYPE_CHECKING:
    from .server import TTSServer

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATIC = Path(__file__).resolve().parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".js": "text/javascript; charset=utf-8"}
# The page's files, read by name from a fixed list: no request path ever reaches the file system.
PAGES = {f"/static/{p.name}": p for p in STATIC.iterdir() if p.suffix in _TYPES} | {"/": STATIC / "index.html"}


def respond(server: "TTSServer", path: str, query: str = "") -> Response:
    if path in PAGES:
        file = PAGES[path]
        return _response(http.HTTPStatus.OK, file.read_bytes(), _TYPES[file.suffix])
    if path == "/health":
        return json_response(http.HTTPStatus.OK, {"status": "ok"})
    if path == "/ready":
        engine, reason = server.serving()
        if engine is None:
            loading = any(slot.state == "loading" for slot in server.scheduler.chain.slots)
            state = "loading" if loading else "failed"
            return json_response(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                 {"status": "unavailable", "state": state, "reason": reason})
        return json_response(http.HTTPStatus.OK, {"status": "ready", "engine": engine, "reason": reason})
    if path == "/metrics":
        server.refresh_gauges()
        return _response(http.HTTPStatus.OK, server.metrics.render(), PROMETHEUS_TYPE)
    if path == "/v1/info":
        return json_response(http.HTTPStatus.OK, info(server))
    if path == "/v1/models":
        engines = [name for name, slot in server.scheduler.slots.items() if slot.state != "failed"]
        return json_response(http.HTTPStatus.OK, o.models(server.scheduler.primary.name, engines))
    if path == "/v1/audio/voices":  # Kokoro-FastAPI's shape, which Open WebUI reads; ?legacy=true: plain names
        voices = o.Voices(server.library.voice_names()).listing()
        legacy = "legacy=true" in query
        return json_response(http.HTTPStatus.OK, {"voices": [v["id"] for v in voices] if legacy else voices,
                                                  "languages": server.scheduler.chain.languages()})
    return text_response(http.HTTPStatus.NOT_FOUND, f"Not found: {path}\n")


def info(server: "TTSServer") -> dict[str, Any]:
    scheduler = server.scheduler
    engine, reason = server.serving()
    engines = {}
    for index, slot in enumerate(scheduler.chain.slots):
        engines[slot.name] = {
            "role": "primary" if index == 0 else "fallback", "position": index + 1,
            "overflow": slot is scheduler.chain.overflow, "state": slot.state, "reason": slot.reason,
            **slot.engine.describe(), "stats": server.metrics.summary(slot.name),
        }
    return {
        "protocol": p.PROTOCOL_VERSION,
        "serving": {"engine": engine, "reason": reason},
        "engines": engines,
        "sample_rate": scheduler.sample_rate,
        "formats": list(p.FORMATS),
        "stream_formats": list(p.STREAM_FORMATS),
        "speakers": {"min": 0, "max": p.MAX_SPEAKER},
        "languages": scheduler.chain.languages(),
        "cache": scheduler.cache.describe(),
        **server.library.describe(),
        "limits": {"max_text_chars": server.max_text_chars, "max_queue": scheduler.max_queue,
                   "max_audio_length_ms": p.MAX_AUDIO_MS, "max_frame_bytes": server.max_frame_bytes},
        "queue_depth": scheduler.depth,
        "interfaces": server.metrics.interfaces,
        "active_connections": len(server.connections),
    }


def json_response(status: http.HTTPStatus, body: dict[str, Any]) -> Response:
    return _response(status, json.dumps(body).encode(), "application/json")


def text_response(status: http.HTTPStatus, text: str) -> Response:
    return _response(status, text.encode(), "text/plain; charset=utf-8")


def _response(status: http.HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-store")])
    return Response(status.value, status.phrase, headers, body)
