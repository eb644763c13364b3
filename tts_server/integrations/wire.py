"""The server's WebSocket as the agent frameworks' services use it: one connection, its session, replies routed to
the request that asked for them.  No framework here: ``pipecat.py`` and ``livekit.py`` are thin layers on it.

The server answers a connection's requests in order, so a binary frame (audio)
belongs to the reply whose ``start`` came last.  Every reply of a request goes
to its ``Reply`` queue, ending with its terminal one (``success``, ``error``,
``cancelled``); other replies (``session``, ``turn_saved``, ``truncated``)
resolve what waits for them.  When the connection drops, the waiting replies
end with an error, and the next request reconnects with ``?session=<id>``: the
conversation resumes where it was (docs/protocol.md, sessions).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import websockets

from ..engines.request import MAX_SPEAKER, OPENAI_VOICES

log = logging.getLogger(__name__)
TERMINAL = ("success", "error", "cancelled")


def speaker_of(voice: int | str) -> int:
    """A speaker id from a framework's voice setting: an id (``3``, ``"3"``) or an OpenAI voice name (``"alloy"``
    is 0, ``"ash"`` 1, ... as the server's own OpenAI API numbers them); ``ValueError`` for anything else."""
    if isinstance(voice, int) or (isinstance(voice, str) and voice.isascii() and voice.isdigit()):
        if 0 <= int(voice) <= MAX_SPEAKER:
            return int(voice)
    elif isinstance(voice, str) and voice.lower() in OPENAI_VOICES:
        return OPENAI_VOICES.index(voice.lower())
    raise ValueError(f"voice {voice!r} is neither a speaker id (0 to {MAX_SPEAKER}) nor one of "
                     f"{', '.join(OPENAI_VOICES)}")


class ServerError(Exception):
    """An ``error`` reply of the server, with its stable ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass
class Reply:
    """One spoken reply: its audio (bytes of 16-bit mono PCM at ``sample_rate``), words and end, in order."""

    request_id: str
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # bytes | dict (a JSON reply) | ServerError
    sample_rate: int = 24000
    done: bool = False

    async def __aiter__(self):
        """Each item until the terminal reply (included); a dropped connection raises ``ServerError``."""
        while True:
            item = await self.events.get()
            if isinstance(item, ServerError):
                raise item
            yield item
            if isinstance(item, dict) and item.get("status") in TERMINAL:
                return


class CSMClient:
    """A connection to the server at ``url`` (``ws://host:port``), bound to ``session`` (a new one when None)."""

    def __init__(self, url: str, api_key: str | None = None, session: str | None = None) -> None:
        self.url, self.api_key, self.session = url, api_key, session
        self.ws: Any = None
        self.replies: dict[str, Reply] = {}
        self.truncated: dict[str, asyncio.Future] = {}
        self._current: Reply | None = None
        self._turn: asyncio.Future | None = None
        self._reader: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)

    # -- the connection -------------------------------------------------------------------------------------------
    async def connect(self) -> None:
        """Open the connection (resuming the session, or creating one); a no-op while it is open."""
        async with self._lock:
            if self.ws is not None:
                return
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            ws = await websockets.connect(self._address(), additional_headers=headers, max_size=None)
            if self.session is None:
                await ws.send(json.dumps({"type": "session"}))
            while True:  # up to the session's reply (a loading notice may come first)
                reply = json.loads(await ws.recv())
                if reply.get("status") == "session":
                    self.session = reply["session"]
                    break
                if reply.get("status") == "error":
                    await ws.close()
                    raise ServerError(reply.get("code", "error"), reply.get("message", ""))
            self.ws = ws
            self._reader = asyncio.create_task(self._read(ws), name="csm-client-reader")

    def _address(self) -> str:
        parts = urlsplit(self.url)
        query = "&".join(q for q in (parts.query, urlencode({"session": self.session}) if self.session else "") if q)
        return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", query, ""))

    async def close(self) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            await ws.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        self._drop("the client closed the connection")

    async def send(self, message: dict | bytes) -> None:
        """Send one message, connecting (or reconnecting, to the same session) first if needed."""
        await self.connect()
        await self.ws.send(message if isinstance(message, bytes) else json.dumps(message))

    # -- replies --------------------------------------------------------------------------------------------------
    def new_id(self, prefix: str = "r") -> str:
        return f"{prefix}{next(self._ids)}"

    async def speak(self, request_id: str, text: str = "", **options: Any) -> Reply:
        """Open a streamed text (``text_stream``) whose audio streams back as 16-bit PCM; ``text`` its beginning."""
        reply = self.replies[request_id] = Reply(request_id)
        await self.send({"type": "synthesize", "request_id": request_id, "text_stream": True, "stream": True,
                         "format": "pcm", "text": text, **options})
        return reply

    async def text(self, request_id: str, delta: str, flush: bool = False) -> None:
        await self.send({"type": "text", "request_id": request_id, "delta": delta, "flush": flush})

    async def end(self, request_id: str) -> None:
        await self.send({"type": "text_end", "request_id": request_id})

    async def cancel(self, request_id: str, played_ms: float | None = None) -> float | None:
        """Stop a reply; with ``played_ms`` the session keeps only what was heard: returns the seconds it kept
        (the ``truncated`` reply), or None when the server did not say within 10 s."""
        message: dict[str, Any] = {"type": "cancel", "request_id": request_id}
        if played_ms is not None:
            message["played_ms"] = max(0.0, float(played_ms))
            waiter = self.truncated[request_id] = asyncio.get_running_loop().create_future()
        try:
            await self.send(message)
            if played_ms is None:
                return None
            with contextlib.suppress(asyncio.TimeoutError):
                return await asyncio.wait_for(waiter, 10)
            return None
        finally:
            self.truncated.pop(request_id, None)

    # -- the other side's turns ---------------------------------------------------------------------------------
    async def start_turn(self, speaker: int, sample_rate: int) -> None:
        """A streamed turn of ``speaker``: then ``audio`` (16-bit mono PCM) and ``end_turn``."""
        await self.send({"type": "turn_start", "speaker": speaker, "sample_rate": sample_rate})

    async def audio(self, pcm: bytes) -> None:
        await self.send(pcm)

    async def end_turn(self, text: str | None) -> dict:
        """End the streamed turn with its transcript; the ``turn_saved`` reply (or ``ServerError``)."""
        self._turn = asyncio.get_running_loop().create_future()
        await self.send({"type": "turn_end", **({"text": text} if text else {})})
        try:
            return await asyncio.wait_for(self._turn, 60)
        finally:
            self._turn = None

    # -- reading ----------------------------------------------------------------------------------------------------
    async def _read(self, ws) -> None:
        try:
            async for frame in ws:
                if isinstance(frame, bytes):
                    if self._current is not None:
                        self._current.events.put_nowait(frame)
                    continue
                self._route(json.loads(frame))
        except websockets.ConnectionClosed:
            pass
        finally:
            if self.ws is ws:
                self.ws = None
                self._drop("the connection to the server closed")

    def _route(self, reply: dict) -> None:
        status, request_id = reply.get("status"), reply.get("request_id")
        target = self.replies.get(request_id) if request_id else None
        if status == "start" and target is not None:
            target.sample_rate = int(reply.get("sample_rate", target.sample_rate))
            self._current = target
        if status == "truncated" and request_id in self.truncated:
            _settle(self.truncated[request_id], float(reply["kept_s"]))
        elif status == "turn_saved" or (status == "error" and target is None and self._turn is not None):
            if self._turn is not None:  # a streamed turn's end waits for its answer (an error without an id)
                _settle(self._turn, reply if status == "turn_saved" else ServerError(reply.get("code", "error"),
                                                                                     reply.get("message", "")))
        elif target is not None:
            target.events.put_nowait(reply)
            if status in TERMINAL:
                target.done = True
                self.replies.pop(request_id, None)
                if self._current is target:
                    self._current = None
        elif status == "error":
            log.warning("The TTS server said: %s (%s)", reply.get("message"), reply.get("code"))

    def _drop(self, why: str) -> None:
        """Every reply still waiting ends with an error: the connection that would carry it is gone."""
        for reply in self.replies.values():
            reply.events.put_nowait(ServerError("connection_closed", why))
        self.replies.clear()
        self._current = None
        for waiter in [*self.truncated.values(), *([self._turn] if self._turn else [])]:
            _settle(waiter, ServerError("connection_closed", why))


def _settle(waiter: asyncio.Future, outcome: Any) -> None:
    """A waiter's result (or exception), once: a second answer for it is ignored."""
    if not waiter.done():
        waiter.set_exception(outcome) if isinstance(outcome, BaseException) else waiter.set_result(outcome)
