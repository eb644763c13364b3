"""How a job that ran ends: its last words, its turns stored in its session, then counted, cached and answered.

The scheduler's workers run the engines; what follows a run is here, so that the scheduler reads as a queue and
its workers.  A reply whose last words still wait for the aligner (``Outcome.then``), or whose turns must be stored
in a session (``job.persist``), is finished on the loop, not on the engine's worker thread: a slow aligner or
store never holds an engine, and its engine takes its next job meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from . import cache
from ..engines.errors import ErrorCode, Refusal
from .cache import AudioCache
from .events import Failed
from .fair import discard
from .generation import Ending, Outcome
from .jobs import EngineSlot, Job
from .metrics import Metrics
from .routing import Chain

log = logging.getLogger(__name__)


class Endings:
    """The steps after a job's engine work; ``wake`` tells the scheduler an engine place came free."""

    def __init__(self, chain: Chain, metrics: Metrics, audio_cache: AudioCache, generation_timeout: float,
                 wake: Callable[[], None]) -> None:
        self.chain = chain
        self.metrics = metrics
        self.cache = audio_cache
        self.generation_timeout = generation_timeout
        self.wake = wake
        self._unstored: dict[Job, tuple[Outcome, float]] = {}  # made, to be stored in a session before the reply
        self._wording: dict[Job, tuple[Outcome, float]] = {}  # audio out, its last words still being aligned

    def settle(self, job: Job, slot: EngineSlot, outcome: Outcome, started: float) -> None:
        """End a run on its worker thread, or leave it to ``finish`` on the loop when its words or its store wait."""
        if outcome.then is not None:  # its words wait for the aligner: finished on the loop, this worker freed
            self._wording[job] = outcome, started
        else:
            self._store_or_conclude(job, slot, outcome, started)

    async def finish(self, job: Job) -> None:
        """The steps ``settle`` left to the loop, once the job's worker is done."""
        if job in self._wording:
            await self._await_words(job)
        if job in self._unstored:
            await self._store(job)

    def _store_or_conclude(self, job: Job, slot: EngineSlot, outcome: Outcome, started: float) -> None:
        if outcome.status == Ending.SUCCESS and job.persist is not None and not job.abandoned:
            self._unstored[job] = outcome, started  # stored by ``_store`` on the loop, not on a worker thread
        else:
            self.conclude(job, slot, outcome, started)

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
            outcome = Outcome(Ending.ERROR, 0.0, None, (internal(job),))
        job.slot = slot
        self._store_or_conclude(job, slot, outcome, started)

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
            outcome = Outcome(Ending.ERROR, outcome.audio_seconds, outcome.ttfa, (Failed(
                code, f"The reply was made but could not be stored in its session{why}", job.request_id),))
        self.conclude(job, slot, outcome, started)

    def conclude(self, job: Job, slot: EngineSlot, outcome: Outcome, started: float) -> None:
        """Count, cache and answer a job that ran (from its worker thread, or the loop after ``_store``).

        The job is counted (and cached), and its success hook runs, before its final reply goes out: a client
        that has its answer also finds it in /metrics and /v1/info, and in the context of its next request."""
        self.count(job, slot, outcome, started)
        if outcome.audio is not None and outcome.status == Ending.SUCCESS and not job.abandoned:
            self.cache.put(job.cache_key, cache.Entry(outcome.audio, slot.name, outcome.final[0]))
        if outcome.status == Ending.SUCCESS and job.on_success and not job.abandoned:
            job.loop.call_soon_threadsafe(_succeeded, job)  # runs before the reply below is queued
        job.finish_threadsafe(*outcome.final)

    def count(self, job: Job, slot: EngineSlot, outcome: Outcome, started: float) -> None:
        """One run in the metrics; a run that fell back along the chain counts as a fallback."""
        if job.abandoned:  # the watchdog already answered and counted it
            return
        fallback = job.request.engine is None and slot is not self.chain.first_choice(job.request)
        self.metrics.observe(slot.name, outcome.status, len(job.request.text), time.perf_counter() - started,
                             outcome.audio_seconds, outcome.ttfa, job.interface, fallback=fallback,
                             cache_miss=job.cache_key is not None)


def _succeeded(job: Job) -> None:
    """The job's success hook (remember its turns), before its client can see the reply and send more."""
    try:
        job.on_success(job)
    except Exception:  # the audio went out fine; a failed hook costs only the memory of it
        log.exception("request %s: success hook failed", job.request_id)


def internal(job: Job) -> Failed:
    """Our own bug, told without its details."""
    return Failed(ErrorCode.INTERNAL_ERROR, "Internal server error", job.request_id)
