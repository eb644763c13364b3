"""Jobs and engine slots: the two objects the scheduler moves around.

A ``Job`` is one accepted synthesis request plus the replies it produces, in
order (``outbox``: tuples of typed events, ``core.events``; each interface
encodes them in its own wire format); ``finish`` guarantees exactly one
terminal reply.  An
``EngineSlot`` is an engine plus its load state.  Both are touched from the
event loop; the worker thread only uses the ``*_threadsafe`` methods.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Any, AsyncIterator, Awaitable, Callable

from .events import Audio, Cancelled, Frame
from .fair import discard
from ..engines.request import SynthesisRequest
from ..engines.base import Engine, SynthesisTask


log = logging.getLogger(__name__)
END = None  # outbox sentinel: the job's last reply has been posted


class Job:
    """One accepted synthesis request and the replies it produces, in order."""

    def __init__(self, request: SynthesisRequest, loop: asyncio.AbstractEventLoop,
                 prepare: Callable[["Job"], None] | None = None,
                 on_success: Callable[["Job"], None] | None = None, interface: str = "websocket") -> None:
        self.request = request
        self.interface = interface  # which front door it came through ("websocket", "http"): a metrics label
        self.loop = loop
        self.task = SynthesisTask(request)
        self.cancel_event = self.task.cancel
        self.prepare = prepare  # on the loop, right before work starts: fill task.context
        self.on_success = on_success  # on the loop, after success, before the reply: remember task.produced
        # a coroutine, awaited on the loop after success (its worker already free), before the reply: store
        self.persist: Callable[["Job"], Awaitable[Any]] | None = None
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.progress_at = 0.0  # monotonic time of the last audio chunk (watched for hangs)
        self.owner: object = self  # the connection it came from (one running job per owner)
        self.slot: EngineSlot | None = None
        self.started = False  # a worker picked it up
        self.finished = False  # the terminal reply is posted
        self.audio_sent = False
        self.abandoned = False  # the watchdog gave up on it (its thread may still finish later)
        self.overflow = False  # the queue was full: it waits for the overflow engine instead
        # Prompt state the request does not show (the front door's); None: never cache this job.
        self.cache_salt: Any = None
        self.cache_key: tuple | None = None  # set when its audio, once made, goes into the response cache
        self._unsent = 0  # audio bytes posted but not yet written to the socket
        self._unsent_lock = threading.Lock()
        self._side: set[concurrent.futures.Future] = set()  # its work on other threads (sentences' alignments)

    def unsent_bytes(self, change: int = 0) -> int:
        """Audio bytes the client has not taken yet; the writer subtracts what it sent."""
        with self._unsent_lock:
            self._unsent += change
            return self._unsent

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def attach(self, future: concurrent.futures.Future) -> None:
        """Work done for this job on a shared thread (a sentence's alignment, from any thread): dropped the moment
        the job ends (``cancel``, ``finish``), so no thread spends time on work nobody will read."""
        with self._unsent_lock:
            self._side.add(future)
        future.add_done_callback(self._detach)
        if self.finished or self.cancel_event.is_set():
            discard(future)

    def _detach(self, future: concurrent.futures.Future) -> None:
        with self._unsent_lock:
            self._side.discard(future)

    def _drop_side_work(self) -> None:
        with self._unsent_lock:
            side, self._side = list(self._side), set()
        for future in side:
            discard(future)

    # called on the event loop
    async def replies(self) -> AsyncIterator[tuple[Frame, ...]]:
        """The job's replies in order until its last, a tuple at a time (a whole file's ``Succeeded`` and its
        ``Audio`` are one tuple, so no other reply splits them).  Every interface reads a job this way; a tuple's
        audio counts as taken by the client once the reader asks for the next (the stream's backpressure)."""
        while (item := await self.outbox.get()) is not END:
            yield item
            self.unsent_bytes(-sum(len(frame.data) for frame in item if isinstance(frame, Audio)))

    def post(self, *frames: Frame) -> None:
        """Frames that go out together (a whole file's ``Succeeded`` and its ``Audio``: no other reply between)."""
        if not self.finished:
            self.outbox.put_nowait(frames)

    def finish(self, *frames: Frame) -> None:
        if not self.finished:
            self.post(*frames)
            self.finished = True
            self.outbox.put_nowait(END)
            self._drop_side_work()

    def cancel(self) -> bool:
        """Ask the job to stop; a job not yet started answers ``cancelled`` at once."""
        if self.finished:
            return False
        self.cancel_event.set()
        self._drop_side_work()
        if not self.started:
            self.finish(Cancelled(self.request_id))
        return True

    # called from the worker thread
    def post_threadsafe(self, *frames: Frame) -> None:
        self.loop.call_soon_threadsafe(lambda: self.post(*frames))

    def finish_threadsafe(self, *frames: Frame) -> None:
        self.loop.call_soon_threadsafe(lambda: self.finish(*frames))


class EngineState(str, Enum):
    """An engine slot's load state: ``loading`` -> ``ready`` | ``failed``.  A str, so ``/ready``, ``/v1/info`` and
    ``/metrics`` keep saying the same words."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


class EngineSlot:
    """An engine plus its load state (``EngineState``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.executor = self._new_executor()
        self.state = EngineState.LOADING
        self.reason = "loading"
        self.loaded = asyncio.Event()
        self.load_seconds: float | None = None

    @property
    def name(self) -> str:
        return self.engine.name

    async def load(self) -> None:
        started = time.perf_counter()
        try:
            await asyncio.to_thread(self.engine.load)
        except Exception as exc:  # any failure leaves the server up and says why
            self.state, self.reason = EngineState.FAILED, str(exc) or exc.__class__.__name__
            log.error("%s unavailable: %s", self.name, self.reason)
        else:
            self.state, self.reason = EngineState.READY, "ready"
            self.load_seconds = time.perf_counter() - started
            log.info("%s ready in %.1f s", self.name, self.load_seconds)
        finally:
            self.loaded.set()

    def _new_executor(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self.engine.concurrency, thread_name_prefix=f"{self.engine.name}-worker")

    def replace_executor(self) -> None:
        """Give up on a stuck worker thread: later jobs run on fresh threads (the stuck one finishes alone)."""
        stuck, self.executor = self.executor, self._new_executor()
        stuck.shutdown(wait=False)

    async def close(self, grace: float = 5) -> None:
        """At shutdown: stop the workers, then release what the engine holds (a model, a batch thread, a client).

        The engine is closed once its workers have ended, so none is mid-synthesis when its model goes; a worker
        still busy after ``grace`` s (a stuck engine) is not waited for longer: the process is ending anyway.
        """
        executor = self.executor
        executor.shutdown(wait=False, cancel_futures=True)  # what still waits is for clients that are gone
        waiter = threading.Thread(target=executor.shutdown, name=f"{self.name}-closing", daemon=True)
        waiter.start()
        await asyncio.to_thread(waiter.join, grace)
        if waiter.is_alive():
            log.warning("%s: a worker is still busy after %g s; closing the engine anyway", self.name, grace)
        try:
            await asyncio.to_thread(self.engine.close)
        except Exception:  # the server stops regardless
            log.exception("%s did not close cleanly", self.name)
