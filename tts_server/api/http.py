"""The ASGI application: one FastAPI app for the WebSocket, the OpenAI API, the GET endpoints and the page.

``/health`` says the process is alive; ``/ready`` whether a request without an
``engine`` would be answered now (load balancers route on it); ``/metrics`` is
Prometheus text; ``/v1/info`` describes engines, formats and limits;
``/v1/websocket.schema.json`` is the WebSocket protocol's JSON Schema; ``/``
and ``/static/*`` serve the page; ``/openapi.json`` and ``/docs`` describe the
HTTP API.  ``Guard`` (outermost but CORS) admits every connection through the
same limits as the WebSocket and asks for the API key; errors under ``/v1/``
come in OpenAI's JSON shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.staticfiles import StaticFiles

from ..core.jobs import EngineState
from ..core.events import PROTOCOL_VERSION
from ..core.replies import ErrorCode, Refusal
from ..core.service import Service
from ..engines.request import FORMATS, MAX_AUDIO_MS, MAX_SPEAKER, STREAM_FORMATS
from . import openai, schemas, websocket
from .openai_schemas import Voices, error_body, http_error, models

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATIC = Path(__file__).resolve().parent.parent / "static"
OPEN_PATHS = ("/health", "/openapi.json", "/docs", "/docs/oauth2-redirect")  # no key needed: they hold no data


def build_app(service: Service, max_frame_bytes: int) -> FastAPI:
    app = FastAPI(title="CSM TTS server", version=f"protocol {PROTOCOL_VERSION}", redoc_url=None,
                  description="OpenAI-compatible speech API of the CSM-1B TTS server; the WebSocket protocol is in "
                              "docs/protocol.md and /v1/websocket.schema.json.")
    app.state.service = service
    app.state.websockets = set()
    app.state.max_frame_bytes = max_frame_bytes
    app.include_router(openai.router)
    for path in websocket.PATHS:
        app.add_api_websocket_route(path, websocket.serve)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _routes(app)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Refusal, _protocol_error)
    app.add_middleware(Guard)  # added last = outermost but CORS
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "HEAD", "POST", "OPTIONS"],
                       allow_headers=["authorization", "content-type"],
                       expose_headers=["x-request-id", "x-tts-engine", "x-sample-rate"])
    return app


def get(app: FastAPI, path: str, **options):
    """A GET route that answers HEAD too (load balancers health-check with HEAD); HEAD stays out of the schema."""
    def register(endpoint):
        app.add_api_route(path, endpoint, methods=["GET"], **options)
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)
        return endpoint
    return register


def _service(request: Request) -> Service:
    return request.app.state.service


def _routes(app: FastAPI) -> None:
    """The page and the operator's endpoints (health, readiness, metrics)."""
    svc = _service

    @get(app, "/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    @get(app, "/ws", include_in_schema=False)
    async def ws_over_http() -> PlainTextResponse:
        return PlainTextResponse("This is a WebSocket endpoint: connect with a WebSocket client.\n", 426)

    @get(app, "/health", summary="The process is alive")
    async def health() -> dict:
        return {"status": "ok"}

    @get(app, "/ready", summary="Whether a request without 'engine' is answered now")
    async def ready(request: Request) -> JSONResponse:
        service = svc(request)
        engine, reason = service.serving()
        if engine is None:
            loading = any(slot.state == EngineState.LOADING for slot in service.scheduler.chain.slots)
            state = EngineState.LOADING if loading else EngineState.FAILED
            return JSONResponse({"status": "unavailable", "state": state, "reason": reason}, 503)
        return JSONResponse({"status": "ready", "engine": engine, "reason": reason})

    @get(app, "/metrics", summary="Prometheus metrics")
    async def metrics(request: Request) -> Response:
        service = svc(request)
        service.refresh_gauges()
        return Response(service.metrics.render(), media_type=PROMETHEUS_TYPE)

    _v1_routes(app)


def _v1_routes(app: FastAPI) -> None:
    """``/v1/``: what the server offers (info, models, voices, the protocol's schema) and sessions."""
    svc = _service

    @get(app, "/v1/info", summary="Engines, formats, voices and limits")
    async def info(request: Request) -> dict:
        return describe(svc(request), request.app.state.max_frame_bytes, len(request.app.state.websockets))

    @get(app, "/v1/models", summary="OpenAI's model list: the names clients send")
    async def list_models(request: Request) -> dict:
        service = svc(request)
        engines = [name for name, slot in service.scheduler.slots.items() if slot.state != EngineState.FAILED]
        return models(service.scheduler.primary.name, engines)

    @get(app, "/v1/audio/voices", summary="Voice names (Kokoro-FastAPI's shape)")
    async def voices(request: Request, legacy: bool = False) -> dict:
        service = svc(request)
        listed = Voices(service.library.voice_names()).listing()
        return {"voices": [v["id"] for v in listed] if legacy else listed,
                "languages": service.scheduler.chain.languages()}

    @get(app, "/v1/sessions/{session}", summary="A session's turns, oldest first (never audio)")
    async def session_turns(request: Request, session: str) -> dict:
        turns = await svc(request).sessions.turns(session, _owner(request))
        return {"session": session, "turns": [turn.describe() for turn in turns]}

    @app.delete("/v1/sessions/{session}", summary="Delete a session and its turns")
    async def delete_session(request: Request, session: str) -> dict:
        await svc(request).sessions.delete(session, _owner(request))
        return {"session": session, "deleted": True}

    @get(app, "/v1/websocket.schema.json", summary="JSON Schema of the WebSocket protocol")
    async def websocket_schema() -> dict:
        return schemas.json_schema()


def describe(service: Service, max_frame_bytes: int, websockets: int) -> dict[str, Any]:
    scheduler = service.scheduler
    engine, reason = service.serving()
    return {
        "protocol": PROTOCOL_VERSION,
        "serving": {"engine": engine, "reason": reason},
        "engines": service.engines_info(),
        "sample_rate": scheduler.sample_rate,
        "formats": list(FORMATS),
        "stream_formats": list(STREAM_FORMATS),
        "speakers": {"min": 0, "max": MAX_SPEAKER},
        "languages": scheduler.chain.languages(),
        "cache": scheduler.cache.describe(),
        **service.library.describe(),
        "limits": {"max_text_chars": service.limits.max_text_chars, "max_queue": scheduler.max_queue,
                   "max_audio_length_ms": MAX_AUDIO_MS, "max_frame_bytes": max_frame_bytes},
        "queue_depth": scheduler.depth,
        "interfaces": service.metrics.interfaces,
        "active_connections": websockets,
        "conversation": service.conversation_info(),
    }


def _owner(request: Request) -> str:
    """Whose sessions a request may see (a session is visible only with the key that created it)."""
    return request.app.state.service.admission.owner(request.headers, f"{request.url.path}?{request.url.query}")


# -- errors: OpenAI's JSON shape under /v1/, plain text elsewhere -----------------------------------

def error_response(path: str, status: int, message: str, code: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    if path.startswith("/v1/"):
        return JSONResponse(error_body(status, message, None, code), status, headers)
    return PlainTextResponse(message.rstrip("\n") + "\n", status, headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    path = request.url.path
    known = {404: (f"Not found: {path}", ErrorCode.NOT_FOUND),
             405: (f"{path} does not take {request.method}", ErrorCode.METHOD_NOT_ALLOWED)}
    message, code = known.get(exc.status_code, (str(exc.detail), None))
    return error_response(path, exc.status_code, message, code and code.value, exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    error = exc.errors()[0]
    return error_response(request.url.path, 400, f"{'.'.join(map(str, error['loc']))}: {error['msg']}")


async def _protocol_error(request: Request, exc: Refusal) -> Response:
    status, body = http_error(exc)
    if not request.url.path.startswith("/v1/"):
        return PlainTextResponse(exc.message.rstrip("\n") + "\n", status)
    return JSONResponse(body, status, {"retry-after": "1"} if status == 429 else None)


class Guard:
    """Admission (every connection counted once, as the WebSocket's) and the API key, for HTTP requests.

    WebSocket handshakes pass through: ``websocket.serve`` applies the same two
    rules with the WebSocket's own answers (a denial response, or an error
    message and close 1013).  A CORS preflight needs no key: browsers never send
    credentials on one.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        service: Service = scope["app"].state.service  # Starlette puts the app in the scope
        request = Request(scope)
        path = scope["path"]
        client = tuple(scope.get("client") or ("?", 0))
        try:
            service.admission.admit(client, service.admission.proxies.client(client[0], request.headers))
        except Refusal as refusal:
            response = error_response(path, 503, refusal.message, refusal.code.value,
                                      {"connection": "close", "retry-after": "1"})
            return await response(scope, receive, send)
        if scope["method"] != "OPTIONS" and not path.startswith(OPEN_PATHS):
            target = path + ("?" + scope["query_string"].decode("latin-1") if scope["query_string"] else "")
            verdict = service.admission.gate.check(request.headers, target, websocket=False)
            if verdict is not None:
                code = "invalid_api_key" if verdict.status == 401 else None
                response = error_response(path, verdict.status, verdict.reason, code)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)

