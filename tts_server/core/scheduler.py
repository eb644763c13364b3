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
  joins a session is stored after its worker is done (``_store``, on the loop),
  so a slow store never holds an engine;
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
from .fair import discard
from .events import Audio, Cancelled, Failed, Started, failed
from .generation import Outcome, generate
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
        self._unstored: dict[Job, tuple[Outcome, float]] = {}  # made, to be stored in a session before the reply
        self._wording: dict[Job, tuple[Outcome, float]] = {}  # audio out, its last words still being aligned

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
        if isinstance(slot, Refusal):
            raise slot
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

    def route(self, request: SynthesisRequest, overflow: bool = False) -> EngineSlot | Refusal:
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
        status = "cancelled" if job.cancel_event.is_set() else "success"
        self.metrics.cache_hit(entry.engine, status, job.interface)
        if status == "cancelled":
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
            slot = self.route(job.request, job.overflow)
            if isinstance(slot, Refusal):
                self._queue.remove(job)
                job.finish(failed(slot))
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
            if job in self._wording:
                await self._await_words(job)
            if job in self._unstored:
                await self._store(job)
        except Exception:  # preparing the prompt failed: answer the job, keep serving
            log.exception("request %s failed around the worker", job.request_id)
            job.finish(_internal(job))
        finally:
            self.running.discard(job)
            self.wake()

    def wake(self) -> None:
        """Look at the queue again (a job ended, an engine finished loading, ...)."""
        self._wakeup.set()

    async def _await_words(self, job: Job) -> None:
        """A reply's audio is all out and its last words wait for the aligner (the speech thread every connection
        shares, turn by turn): its engine's worker is free meanwhile, and the run ends once they have ended (or
        none has for ``generation_timeout``: the rest are dropped, and the reply says it has no words)."""
        pending, started = self._wording.pop(job)
        slot, job.slot = job.slot, None  # it no longer holds a place on its engine
        self.wake()
        waiting = {asyncio.wrap_future(future) for future in pending.waiting}
        for future in waiting:  # their errors are ``then``'s to read, not asyncio's to report
            future.add_done_callback(lambda done: done.cancelled() or done.exception())
        while waiting:
            done, waiting = await asyncio.wait(waiting, timeout=self.generation_timeout,
                                               return_when=asyncio.FIRST_COMPLETED)
            if not done:
                for future in pending.waiting:
                    discard(future)
                break
        try:
            outcome = await asyncio.to_thread(pending.then)
        except Exception:  # our own bug (placing words, encoding): this request fails, the server lives on
            log.exception("internal error on request %s", job.request_id)
            outcome = Outcome("error", 0.0, None, (_internal(job),))
        job.slot = slot
        if outcome.status == "success" and job.persist is not None and not job.abandoned:
            self._unstored[job] = outcome, started
        else:
            self._conclude(job, slot, outcome, started)

    async def _store(self, job: Job) -> None:
        """Store a made reply's turns in its session (``job.persist``, awaited on the loop: the store's own threads
        do the work), then answer it.  Its engine's worker is free meanwhile; its connection's next job waits, as
        that job is prompted with these turns."""
        outcome, started = self._unstored.pop(job)
        slot, job.slot = job.slot, None  # it no longer holds a place on its engine
        self.wake()
        code, why = None, ""
        try:
            await job.persist(job)  # durable before the client can see the reply
        except Refusal as exc:  # the store is unreachable, the session gone
            code, why = exc.code, f": {exc.message}"
        except Exception:
            log.exception("request %s: its turns could not be stored", job.request_id)
            code = ErrorCode.INTERNAL_ERROR
        if code is not None:
            outcome = Outcome("error", outcome.audio_seconds, outcome.ttfa, (Failed(
                code, f"The reply was made but could not be stored in its session{why}", job.request_id),))
        self._conclude(job, slot, outcome, started)

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
            if time.monotonic() - job.progress_at > self.generation_timeout:
                break
        log.error("%s made no progress on %s for %g s; abandoning its worker thread", slot.name,
                  job.request_id, self.generation_timeout)
        job.cancel_event.set()
        job.finish(Failed(ErrorCode.GENERATION_TIMEOUT,
                          f"{slot.name} produced no audio for {self.generation_timeout:g} s; request abandoned",
                          job.request_id))
        job.abandoned = True
        self.metrics.observe(slot.name, "error", len(job.request.text), self.generation_timeout, interface=job.interface)
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
        this one failed before any audio was sent.

        The job is counted in the metrics (and cached), and its success hook
        runs, before its final reply goes out: a client that has its answer
        also finds it in /metrics and /v1/info, and in the context of its next request.
        """
        started = time.perf_counter()
        keep = job.cache_key is not None and slot.engine.seedable
        try:
            outcome = generate(job, slot.engine, self.sample_rate, self.stream_buffer_seconds, started, keep,
                               self.aligner)
        except Refusal as exc:  # the engine failed (``EngineError``), or the client read too slowly
            retry = self._next_engine(job, slot, exc)
            if retry is not None:
                self._count(job, slot, Outcome("error", 0.0, None, ()), started)
                job.task.produced.clear()
                return retry
            outcome = Outcome("error", 0.0, None, (failed(exc.answering(job.request_id)),))
        except Exception:  # our own bug (resampling, encoding): this request fails, the worker lives on
            log.exception("internal error on request %s", job.request_id)
            outcome = Outcome("error", 0.0, None, (_internal(job),))
        if outcome.then is not None:  # its words wait for the aligner: finished on the loop, this worker freed
            self._wording[job] = outcome, started
            return None
        if outcome.status == "success" and job.persist is not None and not job.abandoned:
            self._unstored[job] = outcome, started  # stored by ``_store`` on the loop, not on this worker thread
            return None
        self._conclude(job, slot, outcome, started)
        return None

    def _conclude(self, job: Job, slot: EngineSlot, outcome: Outcome, started: float) -> None:
        """Count, cache and answer a job that ran (from its worker thread, or the loop after ``_store``)."""
        self._count(job, slot, outcome, started)
        if outcome.audio is not None and outcome.status == "success" and not job.abandoned:
            self.cache.put(job.cache_key, cache.Entry(outcome.audio, slot.name, outcome.final[0]))
        if outcome.status == "success" and job.on_success and not job.abandoned:
            job.loop.call_soon_threadsafe(self._succeeded, job)  # runs before the reply below is queued
        job.finish_threadsafe(*outcome.final)

    @staticmethod
    def _succeeded(job: Job) -> None:
        """The job's success hook (remember its turns), before its client can see the reply and send more."""
        try:
            job.on_success(job)
        except Exception:  # the audio went out fine; a failed hook costs only the memory of it
            log.exception("request %s: success hook failed", job.request_id)

    def _count(self, job: Job, slot: EngineSlot, outcome: Outcome, started: float) -> None:
        if job.abandoned:  # the watchdog already answered and counted it
            return
        fallback = job.request.engine is None and slot is not self.chain.first_choice(job.request)
        self.metrics.observe(slot.name, outcome.status, len(job.request.text), time.perf_counter() - started,
                             outcome.audio_seconds, outcome.ttfa, job.interface, fallback=fallback,
                             cache_miss=job.cache_key is not None)

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


def _internal(job: Job) -> Failed:
    """Our own bug, told without its details."""
    return Failed(ErrorCode.INTERNAL_ERROR, "Internal server error", job.request_id)
