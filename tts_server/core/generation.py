"""One request's run on one engine, in a worker thread: engine chunks -> resample -> the job's replies.

``generate`` streams (``start``, then PCM as it comes) or collects and encodes
the whole file, applies ``max_audio_length_ms``, stops on cancel, enforces the
stream backpressure limit, and returns what happened.  Any exception an engine
raises becomes an ``EngineError`` (``generation_failed``, or out of memory), so
the scheduler only ever sees request-level failures.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import replies as r
from ..audio.codec import Resampler, encode_file, pcm_bytes, streaming_wav_header
from ..audio.stretch import Stretcher
from ..engines.base import Engine, EngineError, SentenceMark, SynthesisTask
from .jobs import ClientTooSlow, Job
from .timing import Aligner, Timing

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """How a run ended: status, seconds of audio, time to first audio, the final frames to post, and
    (when asked to ``keep`` it) every audio byte sent, for the response cache."""

    status: str
    audio_seconds: float
    ttfa: float | None
    final: tuple
    audio: bytes | None = None
    # "words": the audio is all out and its last alignments still run (``waiting``); ``then()`` finishes the run
    # once they have ended, off the engine's worker (the scheduler waits on the loop)
    waiting: list | None = None
    then: Callable[[], "Outcome"] | None = None


def generate(job: Job, engine: Engine, sample_rate: int, stream_buffer_seconds: float, started: float,
             keep: bool = False, aligner: Aligner | None = None) -> Outcome:
    """Stream or collect ``engine``'s audio for ``job``; raises ``EngineError`` when the engine fails."""
    request = job.request
    resample = Resampler(engine.output_rate(request), sample_rate)
    stretched = request.speed != 1.0 and not engine.native_speed
    stretch = Stretcher(engine.output_rate(request), request.speed) if stretched else None
    timing = Timing(job, engine, aligner, stretched, sent_s=lambda: samples / sample_rate,
                    post=(lambda found: words(found)) if request.timestamps and request.stream else None)
    limit = int(request.max_audio_length_ms * sample_rate / 1000) if request.max_audio_length_ms else None
    pieces: list = []
    kept: list[bytes] = []
    samples = 0
    first_audio: float | None = None
    cut = False  # audio past max_audio_length_ms was dropped
    voice = engine.voice_name(request)
    meta = {"engine": engine.name, **({"voice": voice} if voice else {})}

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
            job.post_threadsafe(r.start_reply(request, sample_rate=sample_rate, **meta))
            if request.format == "wav":
                data = streaming_wav_header(sample_rate) + data
        if job.unsent_bytes(len(data)) > stream_buffer_seconds * sample_rate * 2:
            raise ClientTooSlow(stream_buffer_seconds)
        pieces.append(len(data))
        if keep:
            kept.append(data)
        job.post_threadsafe(data)

    def words(found: list) -> None:
        if found and request.stream:
            job.post_threadsafe({"status": "words", "request_id": request.request_id,
                                 "words": [vars(word) for word in found]})

    with contextlib.closing(_engine_chunks(engine, job.task)) as chunks:
        for chunk in chunks:
            if job.cancel_event.is_set() or cut:
                break
            job.progress_at = time.monotonic()
            with timing.lock:  # audio and the words it holds go out in that order, whichever thread sends them
                if isinstance(chunk, SentenceMark):
                    progress = timing.mark(chunk)
                    if request.progress:
                        job.post_threadsafe({"status": "progress", "request_id": request.request_id, **progress})
                else:
                    timing.took(len(chunk))
                    emit(resample(stretch(chunk) if stretch else chunk))
                if request.stream and request.timestamps:
                    words(timing.due(samples / sample_rate))
    if job.cancel_event.is_set():
        return Outcome("cancelled", samples / sample_rate, first_audio, (r.cancelled_reply(request.request_id),))
    tail = stretch(np.zeros(0, np.float32), last=True) if stretch else np.zeros(0, dtype=np.float32)
    with timing.lock:
        emit(resample(tail, last=True))
    if samples == 0:
        raise EngineError("generation_failed", f"{engine.name} produced no audio")
    duration = samples / sample_rate

    def finish() -> Outcome:
        """The rest, once every alignment has ended: the last words, the final reply (a whole file's encoding)."""
        timing.wait()  # (all ended, or dropped: a job cancelled meanwhile drops them, ``Job.attach``)
        if job.cancel_event.is_set():
            return Outcome("cancelled", duration, first_audio, (r.cancelled_reply(request.request_id),))
        with timing.lock:
            heard = [w for w in timing.rest(duration) if w.start_s < duration or not cut]
            words(heard)
        if len(timing.by_sentence) == len(job.task.produced):  # the turns remember their words (a barge-in cut)
            for turn, placed in zip(job.task.produced, timing.by_sentence):
                turn.words = placed
        facts = {"generation_s": round(time.perf_counter() - started, 4), "ttfa_ms": round(1000 * first_audio, 1),
                 "truncated": cut or job.task.truncated, **timing.describe()}
        if request.stream:
            reply = r.success_reply(request, sample_rate=sample_rate, length_bytes=sum(pieces), duration_s=duration,
                                    chunks=len(pieces), **meta, **facts)
            return Outcome("success", duration, first_audio, (reply,), b"".join(kept) if keep else None)
        data = encode_file(np.concatenate(pieces), sample_rate, request.format)
        job.unsent_bytes(len(data))
        job.audio_sent = True
        if request.timestamps and not timing.reason:
            facts["words"] = [vars(word) for word in heard]
        reply = r.success_reply(request, sample_rate=sample_rate, length_bytes=len(data), duration_s=duration,
                                **meta, **facts)
        return Outcome("success", duration, first_audio, (reply, data), data if keep else None)

    if timing.unfinished():  # the audio is all out, the words wait for the aligner: the engine's worker need not
        return Outcome("words", duration, first_audio, (), waiting=timing.unfinished(), then=finish)
    return finish()


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
