"""One request's run on one engine, in a worker thread: engine chunks -> resample -> the job's events.

``generate`` streams (``Started``, then ``Audio`` PCM as it comes, ``Words``
and ``Progress`` beside it) or collects and encodes the whole file, applies
``max_audio_length_ms``, stops on cancel, enforces the stream backpressure
limit, and returns what happened.  Any exception an engine raises becomes an
``EngineError`` (``generation_failed``, or out of memory), so the scheduler
only ever sees request-level failures (a ``Refusal``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import numpy as np

from ..audio.codec import Resampler, encode_file, streaming_wav_header
from ..audio.pcm import SAMPLE_BYTES, pcm_bytes
from ..audio.stretch import Stretcher
from ..engines.base import Engine, EngineError, SentenceMark, SynthesisTask, Word
from ..engines.errors import ClientTooSlow
from .events import Audio, Cancelled, Frame, Progress, Started, Succeeded, Words
from .jobs import Job
from .timing import Aligner, Timing

log = logging.getLogger(__name__)


class Ending(str, Enum):
    """How a run ended (the ``status`` label of the request metrics)."""

    SUCCESS = "success"
    ERROR = "error"
    CANCELLED = "cancelled"
    WORDS = "words"  # not an end yet: the audio is all out and its last word times are still being aligned

    def __str__(self) -> str:
        return self.value


@dataclass
class Outcome:
    """How a run ended: status, seconds of audio, time to first audio, the final frames to post, and
    (when asked to ``keep`` it) every audio byte sent, for the response cache."""

    status: Ending
    audio_seconds: float
    ttfa: float | None
    final: tuple[Frame, ...]
    audio: bytes | None = None
    # WORDS: the audio is all out and its last alignments still run (``waiting``); ``then()`` finishes the run
    # once they have ended, off the engine's worker (the scheduler waits on the loop)
    waiting: list | None = None
    then: Callable[[], "Outcome"] | None = None


def generate(job: Job, engine: Engine, sample_rate: int, stream_buffer_seconds: float, started: float,
             keep: bool = False, aligner: Aligner | None = None) -> Outcome:
    """Stream or collect ``engine``'s audio for ``job``; raises ``EngineError`` when the engine fails."""
    return _Run(job, engine, sample_rate, stream_buffer_seconds, started, keep, aligner).run()


class _Run:
    """One request's run on one engine: the state its steps share (audio taken, sent, kept, cut), and the steps.

    ``run`` takes the engine's chunks on the worker thread; ``finish`` ends the
    run, on that thread or, when the last words still wait for the aligner,
    on another (``Outcome.then``): it reads the state, never changes the audio.
    """

    def __init__(self, job: Job, engine: Engine, sample_rate: int, stream_buffer_seconds: float, started: float,
                 keep: bool, aligner: Aligner | None) -> None:
        request = self.request = job.request
        self.job, self.engine, self.rate, self.started, self.keep = job, engine, sample_rate, started, keep
        self.buffer_bytes = stream_buffer_seconds * sample_rate * SAMPLE_BYTES
        self.buffer_seconds = stream_buffer_seconds
        self.resample = Resampler(engine.output_rate(request), sample_rate)
        stretched = request.speed != 1.0 and not engine.native_speed
        self.stretch = Stretcher(engine.output_rate(request), request.speed) if stretched else None
        self.timing = Timing(job, engine, aligner, stretched, sent_s=lambda: self.samples / sample_rate,
                             post=self._words if request.timestamps and request.stream else None)
        self.limit = int(request.max_audio_length_ms * sample_rate / 1000) if request.max_audio_length_ms else None
        self.pieces: list = []  # collected: the float chunks of the whole file; streamed: each chunk's byte count
        self.kept: list[bytes] = []  # every byte sent, when the response cache wants them
        self.samples = 0
        self.first_audio: float | None = None
        self.cut = False  # audio past max_audio_length_ms was dropped
        self.voice = engine.voice_name(request) or None

    def run(self) -> Outcome:
        job, timing = self.job, self.timing
        with contextlib.closing(_engine_chunks(self.engine, job.task)) as chunks:
            for chunk in chunks:
                if job.cancel_event.is_set() or self.cut:
                    break
                job.progress_at = time.monotonic()
                with timing.lock:  # audio and the words it holds go out in that order, whichever thread sends them
                    self._take(chunk)
        if job.cancel_event.is_set():
            return self._cancelled()
        tail = self.stretch(np.zeros(0, np.float32), last=True) if self.stretch else np.zeros(0, dtype=np.float32)
        with timing.lock:
            self._emit(self.resample(tail, last=True))
        if self.samples == 0:
            raise EngineError("generation_failed", f"{self.engine.name} produced no audio")
        if timing.unfinished():  # the audio is all out, the words wait for the aligner: the engine's worker need not
            return Outcome(Ending.WORDS, self.duration, self.first_audio, (), waiting=timing.unfinished(),
                           then=self.finish)
        return self.finish()

    @property
    def duration(self) -> float:
        return self.samples / self.rate

    def _cancelled(self) -> Outcome:
        return Outcome(Ending.CANCELLED, self.duration, self.first_audio, (Cancelled(self.request.request_id),))

    def _take(self, chunk) -> None:
        """One item of the engine's: a sentence's end (progress, its words) or audio."""
        request, timing = self.request, self.timing
        if isinstance(chunk, SentenceMark):
            progress = timing.mark(chunk)
            if request.progress:
                self.job.post_threadsafe(Progress(request.request_id, **progress))
        else:
            timing.took(len(chunk))
            self._emit(self.resample(self.stretch(chunk) if self.stretch else chunk))
        if request.stream and request.timestamps:
            self._words(timing.due(self.duration))

    def _emit(self, chunk: np.ndarray) -> None:
        """Output-rate audio: cut at ``max_audio_length_ms``, then collected (a whole file) or sent (streamed)."""
        if self.limit is not None and len(chunk) > self.limit - self.samples:
            chunk, self.cut = chunk[: max(0, self.limit - self.samples)], True
        if not len(chunk):
            return
        self.samples += len(chunk)
        if self.first_audio is None:
            self.first_audio = time.perf_counter() - self.started
        if self.request.stream:
            self._send(chunk)
        else:
            self.pieces.append(chunk)

    def _send(self, chunk: np.ndarray) -> None:
        """A streamed chunk as PCM (after ``Started``, and the WAV header of a streamed ``wav``), refused with
        ``client_too_slow`` when the client has left more than the stream buffer unread."""
        job, request = self.job, self.request
        data = pcm_bytes(chunk)
        if not job.audio_sent:
            job.audio_sent = True
            job.post_threadsafe(Started(request.request_id, request.format, self.rate, self.engine.name, self.voice))
            if request.format == "wav":
                data = streaming_wav_header(self.rate) + data
        if job.unsent_bytes(len(data)) > self.buffer_bytes:
            raise ClientTooSlow(self.buffer_seconds)
        self.pieces.append(len(data))
        if self.keep:
            self.kept.append(data)
        job.post_threadsafe(Audio(data))

    def _words(self, found: list[Word]) -> None:
        if found and self.request.stream:
            self.job.post_threadsafe(Words(self.request.request_id, tuple(found)))

    def finish(self) -> Outcome:
        """The rest, once every alignment has ended: the last words, the final reply (a whole file's encoding)."""
        job, timing, duration = self.job, self.timing, self.duration
        timing.wait()  # (all ended, or dropped: a job cancelled meanwhile drops them, ``Job.attach``)
        if job.cancel_event.is_set():
            return self._cancelled()
        with timing.lock:
            heard = [w for w in timing.rest(duration) if w.start_s < duration or not self.cut]
            self._words(heard)
        if len(timing.by_sentence) == len(job.task.produced):  # the turns remember their words (a barge-in cut)
            for turn, placed in zip(job.task.produced, timing.by_sentence):
                turn.words = placed
        if self.request.stream:
            success = self._success(length_bytes=sum(self.pieces), chunks=len(self.pieces))
            return Outcome(Ending.SUCCESS, duration, self.first_audio, (success,),
                           b"".join(self.kept) if self.keep else None)
        data = encode_file(np.concatenate(self.pieces), self.rate, self.request.format)
        job.unsent_bytes(len(data))
        job.audio_sent = True
        words = tuple(heard) if self.request.timestamps and not timing.reason else None
        success = self._success(length_bytes=len(data), words=words)
        return Outcome(Ending.SUCCESS, duration, self.first_audio, (success, Audio(data)), data if self.keep else None)

    def _success(self, **shape) -> Succeeded:
        request = self.request
        return Succeeded(request.request_id, request.format, self.rate, duration_s=round(self.duration, 4),
                         engine=self.engine.name, speaker=request.speaker, voice=self.voice,
                         words_unavailable=self.timing.unavailable(),
                         generation_s=round(time.perf_counter() - self.started, 4),
                         ttfa_ms=round(1000 * self.first_audio, 1), truncated=self.cut or self.job.task.truncated,
                         **shape)


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
