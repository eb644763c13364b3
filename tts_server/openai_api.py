"""OpenAI's ``POST /v1/audio/speech`` on the server's one port: a thin adapter over the shared job/scheduler core.

A request becomes the same ``Job`` a WebSocket request becomes (same queue,
batching, engines, limits, metrics, cancellation): always streamed 16-bit PCM
from the scheduler, encoded here chunk by chunk into the asked format
(``audio.StreamEncoder``) and sent with chunked transfer encoding as it is
generated, or as server-sent events (``stream_format: "sse"``).  The response
head waits for the first audio, so an error before any audio still gets its
HTTP status; a failure after it ends the body without its final chunk (the
client sees an incomplete response, never a short "success").  A client that
disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from . import openai_protocol as o
from . import protocol as p
from .audio import Resampler, StreamEncoder, pcm_bytes
from .engines.csm import SPEED_UNSUPPORTED
from .front import HttpExchange, HttpRequest
from .jobs import END, Busy, Job
from .security import RateLimiter

if TYPE_CHECKING:
    from .server import TTSServer

log = logging.getLogger(__name__)
SPEECH_PATH = "/v1/audio/speech"


class OpenAIApi:
    """The HTTP requests with a body that the front hands over (``front.FrontConnection``)."""

    def __init__(self, server: "TTSServer") -> None:
        self.server = server
        self._rates: dict[str, RateLimiter] = {}  # per client address, as the WebSocket has per connection
        self._live: Counter[str] = Counter()  # requests waiting or running per client address

    async def __call__(self, request: HttpRequest, exchange: HttpExchange) -> None:
        server = self.server
        address = server.proxies.client(request.peer, _Headers(request.headers))
        try:
            verdict = server.gate.check(_Headers(request.headers), request.target, websocket=False)
            if verdict is not None:
                raise o.ApiError(verdict.status, verdict.reason.strip(), None,
                                 "invalid_api_key" if verdict.status == 401 else None)
            if request.path != SPEECH_PATH:
                raise o.ApiError(404, f"No route for {request.method} {request.path}")
            if request.method == "OPTIONS":  # a browser's CORS preflight
                return await exchange.respond(204, b"", "text/plain", _cors(request))
            if request.method != "POST":
                raise o.ApiError(405, f"{request.path} takes POST")
            if server.draining:
                raise o.ApiError(503, "The server is shutting down; retry shortly", None, "shutting_down")
            speech = o.parse_speech(request.body, server.limits(), o.Voices(server.library.voice_names()))
            await self._speak(speech, address, exchange, _cors(request))
        except o.ApiError as exc:
            if exchange.started:
                exchange.abort()
            else:
                retry = [("retry-after", "1")] if exc.status == 429 else []
                await exchange.respond(exc.status, exc.body(), "application/json", [*retry, *_cors(request)])

    async def _speak(self, speech: o.SpeechRequest, address: str, exchange: HttpExchange,
                     cors: list[tuple[str, str]]) -> None:
        server, request = self.server, speech.synthesis
        rate = self._rates.setdefault(address, RateLimiter(server.rate_limit))
        if len(self._rates) > 10_000:  # forget idle addresses rather than grow without bound
            self._rates = {address: rate}
        if not rate.allow():
            raise o.ApiError(429, f"More than {server.rate_limit} requests a minute from your address; slow down",
                             None, "rate_limited")
        if self._live[address] >= server.max_queued_per_connection:
            raise o.ApiError(429, f"Your address already has {server.max_queued_per_connection} requests waiting "
                                  "or running; wait for one to finish", None, "too_many_queued")
        slot = server.scheduler.route(request)
        if isinstance(slot, p.ProtocolError):
            raise o.ApiError.from_reply(slot.reply())
        if request.speed != 1.0 and slot.name == "csm":
            raise o.ApiError(400, SPEED_UNSUPPORTED, "speed")
        job = Job(request, asyncio.get_running_loop(), prepare=lambda j: server.library.stateless_prompt(j.task),
                  interface="http")
        # Its prompt holds the speaker's default voice, which pinning may set while the server runs: the turn itself
        # (hashed by identity) keeps audio made with another voice from answering.
        job.cache_salt = ("http", server.library.voices.get(request.speaker))
        try:
            server.scheduler.submit(job)
        except Busy as exc:
            raise o.ApiError(429, str(exc), None, "busy") from None
        self._live[address] += 1
        try:
            await self._stream(job, speech, exchange, cors)
        finally:
            job.cancel()  # a no-op once it has finished; else the client left or we failed: stop the work
            self._live[address] -= 1
            if self._live[address] <= 0:
                del self._live[address]

    async def _stream(self, job: Job, speech: o.SpeechRequest, exchange: HttpExchange,
                      cors: list[tuple[str, str]]) -> None:
        rate = self.server.scheduler.sample_rate
        out_rate = speech.sample_rate or rate
        encoder = StreamEncoder(speech.response_format, out_rate)
        resample = Resampler(rate, out_rate)
        sse = speech.stream_format == "sse"
        samples = 0
        answered_by: list[tuple[str, str]] = []  # the header naming the engine, from its start reply

        async def send(data: bytes) -> None:
            if not exchange.started:
                content_type = "text/event-stream" if sse else o.CONTENT_TYPES[speech.response_format]
                await exchange.start(200, [("content-type", content_type), ("cache-control", "no-store"),
                                           ("x-request-id", job.request_id), ("x-sample-rate", str(out_rate)),
                                           *answered_by, *cors])
            if data:
                await exchange.send(o.sse_event({"type": "speech.audio.delta",
                                                 "audio": base64.b64encode(data).decode()}) if sse else data)

        while (item := await job.outbox.get()) is not END:
            for frame in item:
                if isinstance(frame, bytes):
                    size = len(frame)
                    if out_rate != rate:
                        frame = pcm_bytes(resample(np.frombuffer(frame, "<i2") / 32767.0))
                    samples += len(frame) // 2
                    await send(encoder.encode(frame))
                    job.unsent_bytes(-size)  # the scheduler's backpressure: this much has left
                    continue
                reply = json.loads(frame)
                if reply["status"] == "start":
                    answered_by.append(("x-tts-engine", reply["engine"]))
                if reply["status"] == "error":
                    raise o.ApiError.from_reply(reply)
                if reply["status"] == "cancelled":
                    raise o.ApiError(503, "The request was cancelled", None, "cancelled")
                if reply["status"] == "success":
                    tail = pcm_bytes(resample(np.zeros(0, np.float32), last=True)) if out_rate != rate else b""
                    samples += len(tail) // 2
                    await send(encoder.encode(tail) + encoder.finish())
                    if sse:  # usage: words in, 80 ms audio frames (CSM's unit) out
                        words, frames = len(speech.synthesis.text.split()), round(samples / out_rate / 0.08)
                        await exchange.send(o.sse_event({"type": "speech.audio.done", "usage": {
                            "input_tokens": words, "output_tokens": frames, "total_tokens": words + frames}}))
                    await exchange.end()
                    return


class _Headers(dict):
    """A header dict the gate and the proxy trust can read like websockets' ``Headers``."""

    def __init__(self, headers: dict[str, str]) -> None:
        super().__init__((name.lower(), value) for name, value in headers.items())

    def get(self, name: str, default=None):
        return super().get(name.lower(), default)

    def get_all(self, name: str) -> list[str]:
        value = super().get(name.lower())
        return [] if value is None else [value]


def _cors(request: HttpRequest) -> list[tuple[str, str]]:
    """CORS headers for browsers calling the API from another origin (the key, if any, still decides)."""
    if "origin" not in request.headers:
        return []
    return [("access-control-allow-origin", "*"), ("access-control-allow-headers", "authorization, content-type"),
            ("access-control-allow-methods", "POST, OPTIONS"), ("access-control-expose-headers", "x-request-id")]
