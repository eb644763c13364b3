"""The request queue, engine routing, and the worker threads that run the models.

Connections hand validated requests to ``Scheduler.submit`` and read replies
from each ``Job.outbox``.  The scheduler owns:

- the bounded FIFO queue (beyond ``max_queue`` waiting jobs a request gets
  ``busy`` at once; cancelled jobs free their place at once);
- engine routing: a request without ``engine`` goes to the primary engine,
  waits while it loads (so a conversation never changes voice), and goes to the
  fallback only once the primary has failed to load; a primary that fails a
  request *before any audio was sent* is retried on the fallback;
- the workers: each engine runs up to ``engine.concurrency`` jobs on its own
  threads (Piper one, CSM ``--max-batch``, one job per connection at a time);
  model compute, resampling and encoding never run on the event loop, so
  handshakes, pings and errors keep flowing while CSM generates;
- a watchdog: a job that produces no audio for ``generation_timeout`` seconds is
  answered ``generation_timeout`` and its stuck thread replaced.

Every accepted job ends with exactly one terminal reply: success, error or
cancelled (``Job.finish`` enforces "exactly one").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import Any

import numpy as np

from . import protocol as p
from .audio import Resampler, encode_file, pcm_bytes, streaming_wav_header
from .engines.base import Engine, EngineError, SynthesisTask
from .jobs import Busy, ClientTooSlow, EngineSlot, Job
from .metrics import Metrics

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, primary: EngineSlot, fallback: EngineSlot | None = None, *,
                 max_queue: int = 32, sample_rate: int = 24000, metrics: Metrics | None = None,
                 stream_buffer_seconds: float = 30, generation_timeout: float = 120) -> None:
        self.primary, self.fallback = primary, fallback
        self.slots = {s.name: s for s in (primary, fallback) if s is not None}
        self.max_queue = max_queue
        self.sample_rate = sample_rate
        self.metrics = metrics or Metrics()
        self.stream_buffer_seconds = stream_buffer_seconds
        self.generation_timeout = generation_timeout
        self._queue: collections.deque[Job] = collections.deque()
        self._wakeup = asyncio.Event()
        self.running: set[Job] = set()
        self._tasks: set[asyncio.Task] = set()

    # -- admission ------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return sum(1 for job in self._queue if not job.finished)

    def submit(self, job: Job) -> str | None:
        """Queue ``job``; raise ``Busy`` when full.  Returns a loading notice when it must wait."""
        if self.depth >= self.max_queue:
            raise Busy(f"The server is busy: {self.max_queue} requests are already queued; retry shortly")
        slot = self.route(job.request)
        if isinstance(slot, p.ProtocolError):
            raise slot
        self._queue.append(job)
        self.wake()
        if slot.state == "loading":
            return f"The {slot.name} model is loading; your request is queued and will be answered when it is ready"
        return None

    def route(self, request: p.SynthesisRequest) -> EngineSlot | p.ProtocolError:
        """The slot that should serve ``request`` now (possibly still loading)."""
        if request.engine is not None:
            slot = self.slots.get(request.engine)
            if slot is None or slot.state == "failed":
                why = slot.reason if slot else "not configured on this server"
                return p.ProtocolError(p.ErrorCode.MODEL_UNAVAILABLE,
                                       f"Engine {request.engine!r} is unavailable: {why}", request.request_id)
            return slot
        if self.primary.state != "failed":
            return self.primary
        if self.fallback is None:
            return p.ProtocolError(p.ErrorCode.MODEL_UNAVAILABLE, f"Model unavailable: {self.primary.reason}",
                                   request.request_id)
        if self.fallback.state == "failed":
            return p.ProtocolError(
                p.ErrorCode.MODEL_UNAVAILABLE,
                f"No engine can serve: {self.primary.name}: {self.primary.reason}; "
                f"{self.fallback.name}: {self.fallback.reason}", request.request_id)
        return self.fallback

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
            slot = self.route(job.request)
            if isinstance(slot, p.ProtocolError):
                self._queue.remove(job)
                job.finish(slot.reply())
                continue
            busy = slot.state == "loading" or any(j.owner is job.owner for j in self.running)
            if busy or sum(j.slot is slot for j in self.running) >= slot.engine.concurrency:
                continue
            self._queue.remove(job)
            job.started, job.slot = True, slot
            self.running.add(job)
            task = asyncio.create_task(self._serve(job, slot), name=f"job-{job.request_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, job: Job, slot: EngineSlot) -> None:
        try:
            if job.prepare:
                job.prepare(job)
            if await self._run_watched(job, slot):  # the retry runs on the fallback's own worker thread
                job.slot = self.fallback
                await self._run_watched(job, self.fallback)
        except Exception:  # preparing the prompt failed: answer the job, keep serving
            log.exception("request %s failed around the worker", job.request_id)
            job.finish(p.error_reply(p.ErrorCode.INTERNAL_ERROR, "Internal server error", job.request_id))
        finally:
            self.running.discard(job)
            self.wake()

    def wake(self) -> None:
        """Look at the queue again (a job ended, an engine finished loading, ...)."""
        self._wakeup.set()

    async def _run_watched(self, job: Job, slot: EngineSlot) -> bool:
        """Run the job on the worker; if it makes no progress for ``generation_timeout`` s, abandon it.

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
        job.finish(p.error_reply(p.ErrorCode.GENERATION_TIMEOUT,
                                 f"{slot.name} produced no audio for {self.generation_timeout:g} s; request abandoned",
                                 job.request_id))
        job.status, job.abandoned = "error", True
        self.metrics.observe(slot.name, "error", len(job.request.text), self.generation_timeout, interface=job.interface)
        slot.replace_executor()
        slot.engine.recover(self.generation_timeout / 2)  # a thread stuck in one step that long is hung
        return False

    def refuse_queued(self, code: p.ErrorCode, message: str) -> int:
        """Answer every job still waiting with an error (shutdown); returns how many."""
        refused = 0
        while self._queue:
            job = self._queue.popleft()
            if not job.finished:
                job.finish(p.error_reply(code, message, job.request_id))
                refused += 1
        return refused

    def _work(self, job: Job, slot: EngineSlot) -> bool:
        """Run one job on ``slot``'s worker thread; ``True`` asks for a retry on the fallback (no audio sent yet).

        The job is counted in the metrics, and its success hook runs, before its
        final reply goes out: a client that has its answer also finds it in
        /metrics and /v1/info, and in the context of its next request.
        """
        started = time.perf_counter()
        try:
            status, audio_seconds, ttfa, final = self._generate(job, slot.engine, started)
        except EngineError as exc:
            if self._retry_on_fallback(job, slot, exc):
                self._count(job, slot, ("error", 0.0, None), started)
                job.task.produced.clear()
                return True
            status, audio_seconds, ttfa = "error", 0.0, None
            final = (p.error_reply(_code(exc.code), exc.message, job.request_id),)
        except Exception:  # our own bug (resampling, encoding): this request fails, the worker lives on
            log.exception("internal error on request %s", job.request_id)
            status, audio_seconds, ttfa = "error", 0.0, None
            final = (p.error_reply(p.ErrorCode.INTERNAL_ERROR, "Internal server error", job.request_id),)
        self._count(job, slot, (status, audio_seconds, ttfa), started)
        if status == "success" and job.on_success and not job.abandoned:
            job.loop.call_soon_threadsafe(self._succeeded, job)  # runs before the reply below is queued
        job.finish_threadsafe(*final)
        return False

    @staticmethod
    def _succeeded(job: Job) -> None:
        """The job's success hook (remember its turns), before its client can see the reply and send more."""
        try:
            job.on_success(job)
        except Exception:  # the audio went out fine; a failed hook costs only the memory of it
            log.exception("request %s: success hook failed", job.request_id)

    def _count(self, job: Job, slot: EngineSlot, outcome: tuple, started: float) -> None:
        if job.abandoned:  # the watchdog already answered and counted it
            return
        status, audio_seconds, ttfa = outcome
        job.status = status
        self.metrics.observe(slot.name, status, len(job.request.text), time.perf_counter() - started,
                             audio_seconds, ttfa, job.interface)

    def _retry_on_fallback(self, job: Job, slot: EngineSlot, exc: EngineError) -> bool:
        fb = self.fallback
        ok = (exc.engine_fault and not job.audio_sent and job.request.engine is None and slot is self.primary
              and fb is not None and fb.state == "ready" and not job.cancel_event.is_set())
        if ok:
            log.warning("%s failed before any audio of %s (%s); retrying on %s",
                        slot.name, job.request_id, exc, fb.name)
        return ok

    def _generate(self, job: Job, engine: Engine, started: float) -> tuple[str, float, float | None, tuple]:
        """Stream or collect the engine's audio; returns (status, audio seconds, time to first audio, final reply)."""
        request = job.request
        resample = Resampler(engine.sample_rate, self.sample_rate)
        limit = int(request.max_audio_length_ms * self.sample_rate / 1000) if request.max_audio_length_ms else None
        pieces: list = []
        samples = 0
        first_audio: float | None = None
        cut = False  # audio past max_audio_length_ms was dropped
        meta = {"engine": engine.name, **_voice(engine)}

        def emit(chunk: np.ndarray) -> None:
            nonlocal samples, first_audio, cut
            if limit is not None and len(chunk) > limit - samples:
                chunk, cut = chunk[: max(0, limit - samples)], True
            if not len(chunk):
                return
            samples += len(chunk)
            if first_audio is None:
                first_audio = time.perf_counter() - started
            if not request.stream:
                pieces.append(chunk)
                return
            data = pcm_bytes(chunk)
            if not job.audio_sent:
                job.audio_sent = True
                job.post_threadsafe(p.start_reply(request, sample_rate=self.sample_rate, **meta))
                if request.format == "wav":
                    data = streaming_wav_header(self.sample_rate) + data
            if job.unsent_bytes(len(data)) > self.stream_buffer_seconds * self.sample_rate * 2:
                raise ClientTooSlow(self.stream_buffer_seconds)
            pieces.append(len(data))
            job.post_threadsafe(data)

        with contextlib.closing(_engine_chunks(engine, job.task)) as chunks:
            for chunk in chunks:
                if job.cancel_event.is_set() or cut:
                    break
                job.progress_at = time.monotonic()
                emit(resample(chunk))
        if job.cancel_event.is_set():
            return "cancelled", samples / self.sample_rate, first_audio, (p.cancelled_reply(request.request_id),)
        emit(resample(_empty(), last=True))
        if samples == 0:
            raise EngineError("generation_failed", f"{engine.name} produced no audio")
        duration = samples / self.sample_rate
        timing = {"generation_s": round(time.perf_counter() - started, 4), "ttfa_ms": round(1000 * first_audio, 1),
                  "truncated": cut or job.task.truncated}
        if request.stream:
            return "success", duration, first_audio, (p.success_reply(
                request, sample_rate=self.sample_rate, length_bytes=sum(pieces), duration_s=duration,
                chunks=len(pieces), **meta, **timing),)
        data = encode_file(np.concatenate(pieces), self.sample_rate, request.format)
        job.unsent_bytes(len(data))
        job.audio_sent = True
        return "success", duration, first_audio, (p.success_reply(
            request, sample_rate=self.sample_rate, length_bytes=len(data), duration_s=duration,
            **meta, **timing), data)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for slot in self.slots.values():
            slot.executor.shutdown(wait=False, cancel_futures=True)


def _engine_chunks(engine: Engine, task: SynthesisTask):
    """The engine's chunks, with any exception it raises turned into ``generation_failed``.

    The engine's generator is closed as soon as the caller stops (cancel,
    client too slow, an error), so it frees what it holds (a batch row) at once.
    """
    with contextlib.closing(engine.synthesize(task)) as chunks:
        while True:
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            except EngineError:
                raise
            except torch_oom() as exc:
                log.error("%s ran out of memory on request %s: %s", engine.name, task.request.request_id, exc)
                _free_accelerator_memory()
                raise EngineError("generation_failed", f"{engine.name} ran out of memory for this request; "
                                                       "try shorter text or retry later") from exc
            except Exception as exc:
                log.exception("%s failed on request %s", engine.name, task.request.request_id)
                raise EngineError("generation_failed",
                                  f"{engine.name} failed: {exc.__class__.__name__}: {exc}") from exc
            yield chunk


def torch_oom() -> type[BaseException]:
    """torch's out-of-memory error type (CUDA, MPS and CPU allocators raise it)."""
    import torch

    return getattr(torch, "OutOfMemoryError", MemoryError)


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        torch.mps.empty_cache()


def _voice(engine: Engine) -> dict[str, Any]:
    voice = engine.describe().get("voice")
    return {"voice": voice} if voice else {}


def _code(code: str) -> p.ErrorCode:
    try:
        return p.ErrorCode(code)
    except ValueError:
        return p.ErrorCode.GENERATION_FAILED


def _empty() -> np.ndarray:
    return np.zeros(0, dtype=np.float32)
