"""The request queue, engine routing, and the worker threads that run the models.

Connections hand validated requests to ``Scheduler.submit`` and read replies
from each ``Job.outbox``.  The scheduler owns:

- the bounded FIFO queue (beyond ``max_queue`` waiting jobs a request gets
  ``busy`` at once; cancelled jobs free their place at once);
- admission: a request whose audio is cached is answered from the cache at
  once (``cache``); beyond ``max_queue`` one that named no engine goes to the
  overflow engine, if there is one, instead of getting ``busy``;
- engine routing along the chain (``routing.Chain``): the first engine that has
  not failed, waited for while it loads; an engine that fails a request
  *before any audio was sent* hands it to the next ready one;
- the workers: each engine runs up to ``engine.concurrency`` jobs on its own
  threads (Piper one, CSM ``--max-batch``, one job per connection at a time);
  model compute, resampling and encoding never run on the event loop, so
  handshakes, pings and errors keep flowing while CSM generates; a reply that
  joins a session is stored after its worker is done (``endings.Endings``, on
  the loop), so a slow store never holds an engine;
- a watchdog: a job that produces no audio for ``generation_timeout`` seconds is
  answered ``generation_timeout`` and its stuck thread replaced.

Every accepted job ends with exactly one terminal reply: success, error or
cancelled (``Job.finish`` enforces "exactly one").
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time

from ..audio.pcm import OUTPUT_RATE
from . import cache
from ..engines.errors import Busy, ErrorCode, Refusal
from ..engines.request import SynthesisRequest
from .cache import AudioCache
from .endings import Endings, internal
from .events import Audio, Cancelled, Failed, Started, failed
from .generation import Ending, Outcome, generate
from .jobs import EngineSlot, EngineState, Job
from .metrics import Metrics
from .timing import Aligner
from .routing import Chain

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, chain: Chain, *, max_queue: int = 32, sample_rate: int = OUTPUT_RATE,
                 metrics: Metrics | None = None, stream_buffer_seconds: float = 30, generation_timeout: float = 120,
                 cache: AudioCache | None = None) -> None:
        self.chain = chain
        self.slots = chain.by_name
        self.max_queue = max_queue
        self.sample_rate = sample_rate
        self.metrics = metrics or Metrics()
        self.cache = cache if cache is not None else AudioCache(0)
        self.stream_buffer_seconds = stream_buffer_seconds
        self.generation_timeout = generation_timeout
        self._queue: collections.deque[Job] = collections.deque()
        self._wakeup = asyncio.Event()
        self.running: set[Job] = set()
        self._tasks: set[asyncio.Task] = set()
        self.aligner: Aligner | None = None  # word times for engines without their own (set by the service)
        self.endings = Endings(chain, self.metrics, self.cache, generation_timeout, self.wake)  # what follows a run

    @property
    def primary(self) -> EngineSlot:
        return self.chain.primary

    # -- admission ------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Jobs waiting in the queue (those sent to the overflow engine have a queue of their own size)."""
        return sum(1 for job in self._queue if not job.finished and not job.overflow)

    @property
    def overflow_depth(self) -> int:
        return sum(1 for job in self._queue if not job.finished and job.overflow)

    def submit(self, job: Job) -> str | None:
        """Queue ``job`` (or answer it from the cache); raise ``Busy`` when full, ``Refusal`` when no
        engine can take it.  Returns a loading notice when it must wait."""
        key = cache.key(job.request, job.cache_salt) if job.cache_salt is not None and self.cache.enabled else None
        if key is not None:
            entry = self.cache.get(key)
            if entry is not None:
                self._spawn(self._replay(job, entry), f"cached-{job.request_id}")
                return None
            job.cache_key = key
        slot = self.route(job.request)
        if self.depth >= self.max_queue:
            overflow = self.chain.overflow_slot(job.request)
            if overflow is None or self.overflow_depth >= self.max_queue:
                raise Busy(f"The server is busy: {self.max_queue} requests are already queued; retry shortly",
                           job.request_id)
            job.overflow, slot = True, overflow
        self._queue.append(job)
        self.wake()
        if slot.state == EngineState.LOADING:
            return f"The {slot.name} model is loading; your request is queued and will be answered when it is ready"
        return None

    def route(self, request: SynthesisRequest, overflow: bool = False) -> EngineSlot:
        """The slot that should serve ``request`` now (possibly still loading); see ``routing.Chain``."""
        return self.chain.route(request, overflow)

    async def _replay(self, job: Job, entry: cache.Entry) -> None:
        """Answer ``job`` from the cache as its engine would have: streamed in chunks, or one file; its reply says
        what the first one said, but for its own id, no time spent, and ``cached``."""
        request, audio = job.request, entry.audio
        job.started = job.audio_sent = True
        reply = dataclasses.replace(entry.success, request_id=request.request_id, generation_s=0.0, ttfa_ms=0.0,
                                    cached=True)
        if request.stream:
            job.post(Started(request.request_id, request.format, self.sample_rate, entry.engine, reply.voice))
            step = self.sample_rate // 2 * 2  # half a second of 16-bit samples: whole samples in every chunk
            reply = dataclasses.replace(reply, chunks=-(-len(audio) // step))
            for offset in range(0, len(audio), step):
                if job.cancel_event.is_set():
                    break
                chunk = audio[offset:offset + step]
                job.unsent_bytes(len(chunk))
                job.post(Audio(chunk))
                await asyncio.sleep(0)  # let the writer send while the rest waits
        else:
            job.unsent_bytes(len(audio))
        status = Ending.CANCELLED if job.cancel_event.is_set() else Ending.SUCCESS
        self.metrics.cache_hit(entry.engine, status, job.interface)
        if status == Ending.CANCELLED:
            job.finish(Cancelled(request.request_id))
        else:
            job.finish(reply, *(() if request.stream else (Audio(audio),)))

    # -- the worker loop --------------------------------------------------------------
    async def run(self) -> None:
        """Start queued jobs as engines have room, oldest first, until cancelled.

        An engine runs up to ``engine.concurrency`` jobs at once (CSM: its batch
        rows; Piper: one).  A connection has at most one job running, so its
        replies, which go out in order, never wait behind its own later work.
        """
        while True:
            self._wakeup.clear()
            self._start_runnable()
            await self._wakeup.wait()

    def _start_runnable(self) -> None:
        for job in list(self._queue):
            if job.finished:  # cancelled while queued
                self._queue.remove(job)
                continue
            try:
                slot = self.route(job.request, job.overflow)
            except Refusal as refusal:  # its engine failed while it waited
                self._queue.remove(job)
                job.finish(failed(refusal))
                continue
            busy = slot.state == EngineState.LOADING or any(j.owner is job.owner for j in self.running)
            if busy or sum(j.slot is slot for j in self.running) >= slot.engine.concurrency:
                continue
            self._queue.remove(job)
            job.started, job.slot = True, slot
            self.running.add(job)
            self._spawn(self._serve(job, slot), f"job-{job.request_id}")

    def _spawn(self, work, name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, job: Job, slot: EngineSlot | None) -> None:
        try:
            if job.prepare:
                job.prepare(job)
            while slot is not None:  # a retry runs on the next engine's own worker thread
                job.slot = slot
                slot = await self._run_watched(job, slot)
            await self.endings.finish(job)
        except Exception:  # preparing the prompt failed: answer the job, keep serving
            log.exception("request %s failed around the worker", job.request_id)
            job.finish(internal(job))
        finally:
            self.running.discard(job)
            self.wake()

    def wake(self) -> None:
        """Look at the queue again (a job ended, an engine finished loading, ...)."""
        self._wakeup.set()

    async def _run_watched(self, job: Job, slot: EngineSlot) -> EngineSlot | None:
        """Run the job on the worker; if it makes no progress for ``generation_timeout`` s, abandon it.

        Returns the engine to retry on when this one failed before any audio.

        A stuck thread cannot be killed: it is left to finish (its output is
        discarded, the job already has its error) and a fresh worker takes over.
        """
        job.progress_at = time.monotonic()
        future = asyncio.get_running_loop().run_in_executor(slot.executor, self._work, job, slot)
        while True:
            done, _ = await asyncio.wait({future}, timeout=min(1.0, self.generation_timeout))
            if done:
                return future.result()
            if job.task.feed is not None and job.task.feed.waiting:  # the text is late, not the engine: the text's
                job.progress_at = time.monotonic()  # own deadline (--text-timeout, the chat timeout) bounds that
            if time.monotonic() - job.progress_at > self.generation_timeout:
                break
        log.error("%s made no progress on %s for %g s; abandoning its worker thread", slot.name,
                  job.request_id, self.generation_timeout)
        job.cancel_event.set()
        job.finish(Failed(ErrorCode.GENERATION_TIMEOUT,
                          f"{slot.name} produced no audio for {self.generation_timeout:g} s; request abandoned",
                          job.request_id))
        job.abandoned = True
        self.metrics.observe(slot.name, Ending.ERROR, len(job.request.text), self.generation_timeout, interface=job.interface)
        slot.replace_executor()
        slot.engine.recover(self.generation_timeout / 2)  # a thread stuck in one step that long is hung
        return None

    def refuse_queued(self, code: ErrorCode, message: str) -> int:
        """Answer every job still waiting with an error (shutdown); returns how many."""
        refused = 0
        while self._queue:
            job = self._queue.popleft()
            if not job.finished:
                job.finish(Failed(code, message, job.request_id))
                refused += 1
        return refused

    def _work(self, job: Job, slot: EngineSlot) -> EngineSlot | None:
        """Run one job on ``slot``'s worker thread; returns the next engine of the chain to retry on, when
        this one failed before any audio was sent.  What follows the run is ``Endings``'s (``settle``).
        """
        started = time.perf_counter()
        keep = job.cache_key is not None and slot.engine.seedable
        try:
            outcome = generate(job, slot.engine, self.sample_rate, self.stream_buffer_seconds, started, keep,
                               self.aligner)
        except Refusal as exc:  # the engine failed (``EngineError``), or the client read too slowly
            retry = self._next_engine(job, slot, exc)
            if retry is not None:
                self.endings.count(job, slot, Outcome(Ending.ERROR, 0.0, None, ()), started)
                job.task.produced.clear()
                return retry
            outcome = Outcome(Ending.ERROR, 0.0, None, (failed(exc.answering(job.request_id)),))
        except Exception:  # our own bug (resampling, encoding): this request fails, the worker lives on
            log.exception("internal error on request %s", job.request_id)
            outcome = Outcome(Ending.ERROR, 0.0, None, (internal(job),))
        self.endings.settle(job, slot, outcome, started)
        return None

    def _next_engine(self, job: Job, slot: EngineSlot, exc: Refusal) -> EngineSlot | None:
        """The engine that takes over ``job`` after ``slot`` failed it, if it may be retried at all (not once audio
        went out, nor a text being written as it is spoken: its sentences were taken)."""
        if not exc.engine_fault or job.audio_sent or job.cancel_event.is_set() or job.task.feed is not None:
            return None
        retry = self.chain.next_after(slot, job.request)
        if retry is not None:
            log.warning("%s failed before any audio of %s (%s); retrying on %s", slot.name, job.request_id, exc,
                        retry.name)
        return retry

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for slot in self.slots.values():
            slot.executor.shutdown(wait=False, cancel_futures=True)
