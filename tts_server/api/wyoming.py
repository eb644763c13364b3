"""The Wyoming protocol (Home Assistant, Rhasspy) on its own port: a thin adapter over the shared job/scheduler core.

``--wyoming-uri`` starts the ``wyoming`` package's own server in the process;
each client gets a ``WyomingConnection`` (the package's ``AsyncEventHandler``).
A ``synthesize`` becomes the same ``Job`` a WebSocket request becomes (same
queue, batching, engines, limits, metrics, cancellation), with the connection
as its owner and its ``History`` as context.  A stream (``synthesize-start`` ..
``synthesize-stop``) is one such job whose text arrives in chunks
(``core.streamed_text``, as the WebSocket's ``text_stream`` and the chat
model's answer): its sentences are spoken as they complete, by one decoder, as
one audio stream with no seams.

As on the WebSocket, the connection reads events in one task and delivers
audio in another (``_deliver``), in the order they were asked for, so reading
never waits for generation and a client that goes away is noticed.
``docs/wyoming.md`` describes the events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from urllib.parse import urlparse

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler, AsyncServer
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from ..core import replies as p
from ..core.context import History
from ..core.events import Audio, Cancelled, Failed, Succeeded
from ..core.jobs import EngineState, Job
from ..core.security import RateLimiter, is_loopback
from ..core.service import Service
from ..core.streamed_text import StreamedText
from ..engines import registry
from ..engines.request import SynthesisRequest
from . import wyoming_events as w
from .openai_schemas import Voices
from .wyoming_zeroconf import announce

log = logging.getLogger(__name__)
MAX_MALFORMED = 16  # malformed events in a row before the connection is closed
INTERNAL = p.Refusal(p.ErrorCode.INTERNAL_ERROR, "Internal server error")  # a bug: said without its details


class WyomingApi:
    """The Wyoming server beside the WebSocket/HTTP port, on the same core."""

    def __init__(self, service: Service, uri: str, zeroconf_name: str | None = None) -> None:
        self.service, self.uri, self.zeroconf_name = service, uri, zeroconf_name
        self.connections: set[WyomingConnection] = set()
        self._server: AsyncServer | None = None
        self._zeroconf = None

    async def start(self) -> None:
        self._server = AsyncServer.from_uri(self.uri)
        await self._server.start(lambda reader, writer: WyomingConnection(self, reader, writer))
        log.info("Wyoming listening on %s", self.uri)
        host = urlparse(self.uri).hostname
        if self.service.admission.gate.requires_key and host is not None and not is_loopback(host):
            log.warning("Wyoming has no authentication: the API key does not protect %s; bind it to 127.0.0.1 "
                        "or a trusted network", self.uri)
        if self.zeroconf_name is not None:
            self._zeroconf = await announce(self.uri, self.zeroconf_name)

    async def stop(self) -> None:
        if self._zeroconf is not None:
            await self._zeroconf.async_close()
        if self._server is not None:
            await self._server.stop()
        for connection in list(self.connections):
            connection.cancel()

    def live(self) -> bool:
        """Whether some connection still has a generation to deliver."""
        return any(c.busy for c in self.connections)

    def refuse_unqueued(self, refusal: p.Refusal) -> None:
        """At shutdown: streams whose job is in no queue yet (their first sentence, or their turn, is still to
        come) end with ``refusal``, delivered in their turn like any other reply."""
        for connection in self.connections:
            for text in list(connection.texts):
                if not text.job.started and not text.job.finished:
                    text.fail(refusal)

    def voices(self) -> Voices:
        return Voices(self.service.library.voice_names())

    def named_voices(self) -> dict[str, tuple[str, str | None]]:
        """Voice names that pick an engine -> (engine, language): the names of the engines whose voices are not the
        server's named ones (those keep the routing), and each voice of an engine that lists its own (Piper's)."""
        named: dict[str, tuple[str, str | None]] = {}
        for name, slot in self.service.scheduler.slots.items():
            listing = registry.capabilities(name).voices
            if listing is registry.VoiceListing.NAMED:
                continue
            named[name] = (name, None)
            for voice in slot.engine.describe().get("voices", []) if listing is registry.VoiceListing.OWN else []:
                named[voice["name"]] = (name, voice.get("language"))
        return named

    def info(self) -> Event:
        """Programs for the engines that serve or are loading, in routing order: the one that answers first, first."""
        slots = self.service.scheduler.chain.slots  # routing order
        engines = {slot.name: slot.engine.describe() for slot in slots if slot.state != EngineState.FAILED}
        return w.describe(engines, self.voices()).event()


class WyomingConnection(AsyncEventHandler):
    """One Wyoming client: events in, audio out, in order; closing it cancels its generation."""

    def __init__(self, api: WyomingApi, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.api, self.service = api, api.service
        self.conversation = History(self.service.library, self.service.limits.max_context_turns)
        self._rate = RateLimiter(self.service.limits.rate_limit)
        # bounded: a client that asks for more than is spoken waits (its reading pauses)
        self._work: asyncio.Queue[w.Speak | w.Stream | w.Stopped | w.Refused | None] = asyncio.Queue(
            self.service.limits.max_queued_per_connection)
        self._waiting = 0  # whole synthesize requests queued on this connection, not yet finished
        self._stream: w.Stream | None = None
        self._job: Job | None = None
        self._watches: set[asyncio.Task] = set()  # each stream's text_timeout
        self.texts: weakref.WeakSet[StreamedText] = weakref.WeakSet()  # its streams' texts (refused at shutdown)

    @property
    def busy(self) -> bool:
        return self._job is not None or not self._work.empty()

    def cancel(self) -> None:
        if self._job is not None:
            self._job.cancel()
        if self._stream is not None and self._stream.text is not None:  # still being written: nobody will hear it
            self._stream.text.job.cancel()
            self._stream.text.close()

    async def run(self) -> None:
        peer = self.writer.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) else "local"
        try:
            self.service.admission.admit(self, address)
        except p.Refusal as refusal:
            with contextlib.suppress(ConnectionError):
                await self._error(refusal.code, refusal.message)
            self.writer.close()
            return
        self.api.connections.add(self)
        deliver = asyncio.create_task(self._deliver())
        try:
            if await self._read_events():  # the client half-closed: it still gets what it asked for
                if self._stream is not None:  # no more text can come: the stream's rest is spoken
                    self._stream.end()
                    self._stream = None
                await self._work.put(None)
                await deliver
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except w.EventTooLarge as exc:  # refused before its bytes are read: the stream cannot be resynchronised
            with contextlib.suppress(ConnectionError):
                await self._error(exc.code, exc.message)
        finally:
            deliver.cancel()
            await asyncio.gather(deliver, return_exceptions=True)
            self.cancel()
            for watch in list(self._watches):
                watch.cancel()
            self.api.connections.discard(self)
            self.service.admission.release(self)
            self.writer.close()

    async def _read_events(self) -> bool:
        """Handle events until the client stops sending (True) or must be dropped (False).

        Events are read here, not with ``wyoming``'s reader, so that declared
        lengths are capped before anything is buffered (``w.EventTooLarge``)
        and no line, however nested, can raise past this loop.
        """
        malformed = 0
        while not self.writer.is_closing():
            try:
                line = await self.reader.readline()
            except ValueError:  # a line over the reader's 64 KiB limit
                raise w.EventTooLarge(p.ErrorCode.INVALID_REQUEST, "An event header line is over 64 KiB") from None
            if not line:
                return True
            try:
                header = w.parse_header(line)
                data = header.data
                if header.data_length:
                    data = {**data, **w.parse_data(await self.reader.readexactly(header.data_length))}
                if header.payload_length:
                    await self.reader.readexactly(header.payload_length)  # a TTS server reads no client audio
            except asyncio.IncompleteReadError as exc:
                await self._error(p.ErrorCode.INVALID_REQUEST, f"The connection ended {len(exc.partial)} bytes into "
                                                               f"an event that declared {exc.expected}")
                return True
            except w.EventTooLarge:
                raise
            except p.Refusal as exc:
                malformed += 1
                await self._error(exc.code, exc.message)
                if malformed >= MAX_MALFORMED:
                    return False
                continue
            malformed = 0
            await self.handle_event(Event(type=header.type, data=data))
        return False

    async def handle_event(self, event: Event) -> bool:
        try:
            if Describe.is_type(event.type):
                await self.write_event(self.api.info())
            elif Ping.is_type(event.type):
                await self.write_event(Pong(text=event.data.get("text")).event())
            elif Synthesize.is_type(event.type):
                if self._stream is None:  # inside a stream it is the reply's full text, sent for old servers
                    await self._synthesize(event.data)
            elif SynthesizeStart.is_type(event.type):
                await self._start(event.data)
            elif SynthesizeChunk.is_type(event.type):
                self._chunk(event.data)
            elif SynthesizeStop.is_type(event.type):
                await self._stop()
            else:
                log.debug("Wyoming: ignored a %r event", event.type)
        except p.Refusal as exc:
            await self._error(exc.code, exc.message)
        except (ConnectionError, asyncio.IncompleteReadError):
            raise
        except Exception:  # a bug must cost one reply, not the connection (as on the WebSocket)
            log.exception("Wyoming: internal error while handling a %r event", event.type)
            await self._error(INTERNAL.code, INTERNAL.message)
        return True

    # -- reading: events become work, in order -------------------------------------------
    def _admit(self) -> None:
        if self.service.admission.draining:
            raise p.shutting_down()
        if not self._rate.allow():
            raise p.rate_limited(self.service.limits.rate_limit)

    def _voice(self, data: dict) -> w.Choice:
        return w.voice_choice(w.read_voice(data), self.api.voices(), self.api.named_voices())

    def _job_for(self, request: SynthesisRequest) -> Job:
        """A generation with this connection's conversation as its context (the sentences before it)."""
        job = Job(request, asyncio.get_running_loop(), prepare=lambda j: self.conversation.prompt_for(j.task),
                  on_success=lambda j: self.conversation.remember(j.task), interface="wyoming")
        job.owner = self
        return job

    def _submit(self, job: Job) -> None:
        if self.service.admission.draining:
            raise p.shutting_down()
        self.service.scheduler.submit(job)

    async def _synthesize(self, data: dict) -> None:
        """A whole text; its refusal, like its failure, is answered in order and ends the connection."""
        if self._waiting >= self.service.limits.max_queued_per_connection:
            raise p.too_many_queued(self.service.limits.max_queued_per_connection)
        self._waiting += 1
        try:
            self._admit()
            work: w.Speak | w.Refused = w.Speak(w.request(w.read_text(data), *self._voice(data),
                                                          self.service.limits.max_text_chars))
        except p.Refusal as exc:
            work = w.Refused(exc)
        except Exception:  # a bug: refused in its turn like any other synthesize (its count is given back)
            log.exception("Wyoming: internal error while taking a synthesize event")
            work = w.Refused(INTERNAL)
        await self._work.put(work)

    async def _start(self, data: dict) -> None:
        """A stream: one request (one rate-limit token), one job for all its sentences, in line from now."""
        if self._stream is not None:
            raise p.Refusal(p.ErrorCode.INVALID_REQUEST, "A stream is already open: send synthesize-stop first")
        self._stream = stream = w.Stream(self._submit)
        self._admit()
        job = self._job_for(w.Synthesize("", *self._voice(data)).to_request())  # the text comes in chunks
        self.service.scheduler.route(job.request)  # a language no engine speaks is refused now, not later
        await self._work.put(stream)  # (a full queue pauses reading: its text_timeout runs from here, not before)
        self.texts.add(text := stream.begin(job, self.service.limits))
        watch = asyncio.create_task(text.watch(), name=f"wyoming-{job.request_id}")
        self._watches.add(watch)
        watch.add_done_callback(self._watches.discard)

    def _chunk(self, data: dict) -> None:
        if self._stream is None:
            raise p.Refusal(p.ErrorCode.INVALID_REQUEST, "synthesize-chunk outside a stream: send "
                                                         "synthesize-start first")
        self._stream.add(w.read_text(data))

    async def _stop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            raise p.Refusal(p.ErrorCode.INVALID_REQUEST, "synthesize-stop outside a stream")
        stream.end()
        await self._work.put(w.Stopped())

    # -- delivering: one generation at a time, as audio events -----------------------------
    async def _deliver(self) -> None:
        while (item := await self._work.get()) is not None:
            failure: p.Refusal | None = None
            try:
                if isinstance(item, w.Stopped):
                    await self.write_event(SynthesizeStopped().event())
                elif isinstance(item, w.Stream):  # its turn: queued now or at its first sentence; one generation
                    item.take_turn()
                    await self._play(item.text.job, item)
                elif isinstance(item, w.Refused):
                    failure = item.error
                    await self._error(failure.code, failure.message)
                else:
                    failure = await self._speak(item.request)
            except ConnectionError:
                raise
            except Exception:  # a bug: this generation fails with an error event, as any failure does
                log.exception("Wyoming: internal error while delivering a generation")
                await self._error(INTERNAL.code, INTERNAL.message)
                failure = INTERNAL
            if isinstance(item, (w.Speak, w.Refused)):
                self._waiting -= 1
                if failure is not None:  # a client waiting for audio-stop learns of the failure at once
                    self.writer.close()  # (Home Assistant reads until audio-stop or the connection's end)
                    return

    async def _speak(self, request: SynthesisRequest) -> p.Refusal | None:
        """A whole synthesize: its audio, or the refusal that ended it (already told)."""
        job = self._job_for(request)
        try:
            self._submit(job)
        except p.Refusal as refusal:
            await self._error(refusal.code, refusal.message)
            return refusal
        return await self._play(job)

    async def _play(self, job: Job, stream: w.Stream | None = None) -> p.Refusal | None:
        """Send ``job``'s audio as it is made: ``audio-start`` at its first audio, ``audio-chunk``s, ``audio-stop``
        at its end.  Returns the refusal that ended it (None: it succeeded), already told with an ``error`` event;
        a stream's audio that had begun is then still closed with ``audio-stop`` (a whole synthesize's connection
        is closed instead)."""
        rate = self.service.scheduler.sample_rate
        audio_start = AudioStart(rate=rate, width=2, channels=1).event()
        self._job, started, failure = job, False, None
        try:
            async for item in job.replies():
                for frame in item:
                    match frame:
                        case Audio(data=pcm):
                            if not started:
                                await self.write_event(audio_start)
                                started = True
                            await self.write_event(AudioChunk(rate=rate, width=2, channels=1, audio=pcm).event())
                        case Failed():
                            failure = frame.refusal()
                        case Cancelled() if not (stream and stream.silent):  # only the server cancels a job
                            failure = p.Refusal(p.ErrorCode.SHUTTING_DOWN,  # whose client is still here
                                                "The request was cancelled: the server is shutting down")
                        case Succeeded() if not started:
                            await self.write_event(audio_start)
                            started = True
        finally:
            self._job = None
            job.cancel()  # a no-op once it has finished; else the client left: stop the work
        if failure is not None:
            await self._error(failure.code, failure.message)
        if started and (failure is None or stream is not None):
            await self.write_event(AudioStop().event())
        return failure

    async def _error(self, code: p.ErrorCode, message: str) -> None:
        await self.write_event(Error(text=message, code=p.ErrorCode(code).value).event())
