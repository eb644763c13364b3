"""OpenAI's ``POST /v1/audio/speech``: a thin adapter over the shared job/scheduler core.

A request becomes the same ``Job`` a WebSocket request becomes (same queue,
batching, engines, limits, metrics, cancellation): always streamed 16-bit PCM
from the scheduler, resampled and encoded here chunk by chunk into the asked
format off the event loop, and sent as it is generated (chunked transfer
encoding), or as server-sent events (``stream_format: "sse"``).  The response
head waits for the first audio, so an error before any audio still gets its
HTTP status; a failure after it drops the connection before the body's final
chunk (the client sees an incomplete response, never a short "success").  A
client that disconnects cancels its generation; one that stops reading is
dropped after ``--write-timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections import Counter
from dataclasses import asdict

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from ..audio import captions
from ..audio.codec import Resampler, StreamEncoder, codec_rate
from ..audio.pcm import FRAME_SECONDS, pcm_bytes, to_float
from ..core import replies as r
from ..core.events import Audio, Cancelled, Failed, Started, Succeeded, Words
from ..core.jobs import Job
from ..core.security import RateLimiter
from ..core.service import Service
from ..engines.base import Word
from ..engines.errors import ErrorCode, Refusal
from .openai_schemas import (CAPTIONS, CONTENT_TYPES, SpeechBody, SpeechRequest, Voices, http_error, parse_speech,
                             sse_event)
from .schema_rules import MAX_TEXT_FRAME, Limits

log = logging.getLogger(__name__)
MAX_BODY = MAX_TEXT_FRAME  # the largest request body (the WebSocket's text-frame cap)
router = APIRouter()
_BODY_SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": SpeechBody.model_json_schema(ref_template="#/components/schemas/{model}")}}}}
_AUDIO = {200: {"description": "The audio, streamed as it is generated (or server-sent events with stream_format "
                               "'sse')", "content": {t: {} for t in {*CONTENT_TYPES.values(), "text/event-stream"}}}}


class PerAddress:
    """The WebSocket's per-connection limits, per client address: HTTP requests share no connection."""

    def __init__(self) -> None:
        self.rates: dict[str, RateLimiter] = {}
        self.live: Counter[str] = Counter()  # requests waiting or running

    def admit(self, service: Service, address: str) -> None:
        rate = self.rates.setdefault(address, RateLimiter(service.limits.rate_limit))
        if len(self.rates) > 10_000:  # forget idle addresses rather than grow without bound
            self.rates = {address: rate}
        if not rate.allow():
            raise r.rate_limited(service.limits.rate_limit, who="your address")
        if self.live[address] >= service.limits.max_queued_per_connection:
            raise r.too_many_queued(service.limits.max_queued_per_connection, who="Your address")
        self.live[address] += 1

    def done(self, address: str) -> None:
        self.live[address] -= 1
        if self.live[address] <= 0:
            del self.live[address]


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The body, refused with 413 past ``limit`` (before reading it when Content-Length says so)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise Refusal(ErrorCode.REQUEST_TOO_LARGE, f"The request body is too large: the limit is {limit} bytes")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise Refusal(ErrorCode.REQUEST_TOO_LARGE, f"The request body is too large: the limit is {limit} bytes")
    return bytes(body)


@router.post("/v1/audio/speech", openapi_extra=_BODY_SCHEMA, responses=_AUDIO, summary="Speak text (OpenAI's API)")
async def speech(request: Request) -> Response:
    service: Service = request.app.state.service
    if service.admission.draining:
        raise r.shutting_down()
    body = await read_body(request)
    limits = Limits(max_text_chars=service.limits.max_text_chars, emotions=service.emotions)
    spoken = parse_speech(body, limits, Voices(service.library.voice_names()))
    synthesis = spoken.synthesis
    slot = service.scheduler.route(synthesis)
    if spoken.response_format in CAPTIONS and slot.engine.words and service.scheduler.aligner is None:
        raise Refusal(ErrorCode.INVALID_REQUEST, f"No captions here: {slot.engine.words}", param="response_format")
    owner = service.admission.owner(request.headers, f"{request.url.path}?{request.url.query}")
    history = [] if spoken.session is None else \
        [turn.context() for turn in await service.sessions.turns(spoken.session, owner)]
    address = service.admission.proxies.client(request.client.host if request.client else "?", request.headers)
    per_address: PerAddress = request.app.state.per_address
    per_address.admit(service, address)

    def prepare(job: Job) -> None:  # the speaker's default voice, then the session's turns, oldest first
        service.library.stateless_prompt(job.task)
        job.task.context += history[-service.limits.max_context_turns:]

    job = Job(synthesis, asyncio.get_running_loop(), prepare=prepare, interface="http")
    if spoken.session is None:
        # Its prompt holds the speaker's default voice, which pinning may set while the server runs: the turn itself
        # (hashed by identity) keeps audio made with another voice from answering.
        job.cache_salt = ("http", service.library.voices.get(synthesis.speaker))
    else:  # the reply joins the session before its last byte is sent
        job.persist = lambda j: service.sessions.extend(spoken.session, owner, j.task.produced)  # a coroutine
    try:
        service.scheduler.submit(job)
    except Refusal:
        per_address.done(address)
        raise
    return SpeechStream(job, spoken, service.scheduler.sample_rate, lambda: per_address.done(address))


class SpeechStream(Response):
    """The response of one accepted speech request: an ASGI app that streams its job's audio."""

    def __init__(self, job: Job, speech: SpeechRequest, rate: int, done) -> None:
        self.background = None
        self.job, self.speech, self.rate, self._done = job, speech, rate, done
        # a rate the codec takes (opus has five): resample to the nearest one above, else the highest
        self.captions = speech.response_format in CAPTIONS
        self.out_rate = speech.sample_rate or codec_rate("pcm" if self.captions else speech.response_format, rate)
        self.encoder = None if self.captions else StreamEncoder(speech.response_format, self.out_rate)
        self.words: list[Word] = []
        self.resample = Resampler(rate, self.out_rate)
        self.samples = 0
        self.started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope["app"]
        client = tuple(scope.get("client") or ())
        write_timeout = app.state.write_timeout
        watcher = asyncio.create_task(self._cancel_on_disconnect(receive))

        async def deliver(message: dict) -> None:
            try:
                await asyncio.wait_for(send(message), write_timeout)
            except asyncio.TimeoutError:
                raise ConnectionAbortedError(f"the client read nothing for {write_timeout:g} s") from None

        try:
            await self._stream(deliver)
        except Refusal as exc:
            if not self.started:
                status, body = http_error(exc)
                await send({"type": "http.response.start", "status": status, "headers": [
                    (b"content-type", b"application/json"),
                    *([(b"retry-after", b"1")] if status == 429 else [])]})
                await send({"type": "http.response.body", "body": json.dumps(body).encode()})
            else:  # no final chunk: the client sees an incomplete body, never a short success
                app.state.connections.abort(client)
        except ConnectionAbortedError as exc:
            log.info("Dropped an HTTP client at %s: %s", client[0] if client else "?", exc)
            app.state.connections.abort(client)
        finally:
            watcher.cancel()
            self.job.cancel()  # a no-op once it has finished; else the client left or we failed: stop the work
            self._done()

    async def _cancel_on_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.job.cancel()

    async def _stream(self, send) -> None:
        """The job's events as the response: audio (encoded here), words (SSE), and its end or failure."""
        job, sse = self.job, self.speech.stream_format == "sse"
        engine = b""
        async for item in job.replies():
            for frame in item:
                match frame:
                    case Audio(data=pcm):
                        if not self.captions:  # captions: the speech's words go out, not its audio
                            await self._send(send, await asyncio.to_thread(self._encode, pcm, False), engine, sse)
                    case Started():
                        engine = frame.engine.encode()
                    case Failed():
                        raise frame.refusal()
                    case Cancelled():
                        raise Refusal(ErrorCode.CANCELLED, "The request was cancelled")
                    case Words():
                        await self._words(send, frame.words, engine, sse)
                    case Succeeded():
                        return await self._finish(send, frame, engine, sse)

    async def _words(self, send, words: tuple[Word, ...], engine: bytes, sse: bool) -> None:
        """Words of the speech: kept for its captions; an SSE stream sends them at once."""
        self.words += words
        if sse:
            await self._send(send, b"", engine, sse)
            await send({"type": "http.response.body", "more_body": True,
                        "body": sse_event({"type": "speech.words", "words": [asdict(word) for word in words]})})

    async def _finish(self, send, success: Succeeded, engine: bytes, sse: bool) -> None:
        """The speech is complete: its captions, or the encoder's last bytes (and SSE's usage); then the body ends."""
        if self.captions:
            if success.words_unavailable is not None:
                raise Refusal(ErrorCode.MODEL_UNAVAILABLE, f"No captions: {success.words_unavailable}")
            make = captions.vtt if self.speech.response_format == "vtt" else captions.srt
            await self._send(send, make(self.words).encode(), engine, False)
        else:
            data = await asyncio.to_thread(self._encode, b"", True)
            await self._send(send, data, engine, sse)
            if sse:  # usage: words in, 80 ms audio frames (CSM's unit) out
                words = len(self.speech.synthesis.text.split())
                frames = round(self.samples / self.out_rate / FRAME_SECONDS)
                await send({"type": "http.response.body", "more_body": True, "body": sse_event({
                    "type": "speech.audio.done",
                    "usage": {"input_tokens": words, "output_tokens": frames,
                              "total_tokens": words + frames}})})
        await send({"type": "http.response.body", "body": b""})

    def _encode(self, pcm: bytes, last: bool) -> bytes:
        """Resample and encode one chunk (on a worker thread: mp3 and FLAC cost real CPU)."""
        if self.out_rate != self.rate:
            pcm = pcm_bytes(self.resample(to_float(pcm), last=last))
        self.samples += len(pcm) // 2
        data = self.encoder.encode(pcm) if pcm else b""
        return data + self.encoder.finish() if last else data

    async def _send(self, send, data: bytes, engine: bytes, sse: bool) -> None:
        if not self.started:
            self.started = True
            content_type = "text/event-stream" if sse else CONTENT_TYPES[self.speech.response_format]
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", content_type.encode()), (b"cache-control", b"no-store"),
                (b"x-request-id", self.job.request_id.encode()), (b"x-sample-rate", str(self.out_rate).encode()),
                *([(b"x-tts-engine", engine)] if engine else [])]})
        if data:
            body = sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}) if sse else data
            await send({"type": "http.response.body", "body": body, "more_body": True})
