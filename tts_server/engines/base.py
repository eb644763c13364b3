"""The one small interface every speech engine implements.

An engine knows nothing about sockets or the queue: it loads its model
(blocking, in a loader thread), describes itself, and turns one validated
request into float32 mono audio chunks at its native ``sample_rate``.  It runs
in the scheduler's worker thread and checks ``task.cancel`` between chunks
(CSM: between frames) so that a cancelled request stops within one step's compute.
"""

from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

import numpy as np

from ..audio.pcm import OUTPUT_RATE
from .errors import EngineError
from .request import SynthesisRequest

T = TypeVar("T")


@dataclass(frozen=True)
class Word:
    """One word of the request's text and when it is heard, in seconds (from a sentence's start in a
    ``SentenceMark``, from the reply's start once the core has placed it)."""

    word: str
    start_s: float
    end_s: float

    def shifted(self, offset: float, scale: float = 1.0) -> "Word":
        return Word(self.word, round((self.start_s * scale) + offset, 3), round((self.end_s * scale) + offset, 3))


@dataclass(eq=False)
class SentenceMark:
    """Yielded by an engine after a sentence's last audio chunk: which text that audio said, and its words' times
    when the engine knows them exactly (Piper); otherwise the core may align ``audio`` (its rate is the engine's)
    against ``text``.  ``text.split()`` of the marks, in order, is the request's ``text.split()``, except that a
    word longer than a sentence piece (``split_sentences``) is cut between two marks: the core joins it again."""

    text: str
    words: list[Word] | None = None
    audio: np.ndarray | None = None


def one_per_process(load: Callable[[], T]) -> Callable[[], T]:
    """``load`` run once, on first use, from whichever thread asks first: the process's one copy of a model that
    every connection shares (an ONNX session; each caller keeps its own state)."""
    lock, made = threading.Lock(), []

    def shared() -> T:
        with lock:
            if not made:
                made.append(load())
            return made[0]
    shared.__doc__ = f"The process's one {getattr(load, '__name__', 'model')}, loaded on first use."
    return shared


def audio_only(items) -> Iterator[np.ndarray]:
    """An engine's output without its sentence marks (the audio chunks alone)."""
    return (item for item in items if not isinstance(item, SentenceMark))


# The key of ``ContextTurn.cache`` that holds a turn's codes, named for the engine that keeps turns as codes (the
# registry's ``encodes_turns``: CSM, its Mimi codes).  The other side's turns and stored sessions hold their codes
# under it, so it stays this one value whatever the chain.
TURN_CODES = "csm"


@dataclass(eq=False)
class ContextTurn:
    """Something said before the text to speak: who, what, and how it sounded.

    ``cache`` is shared by every turn made from the same clip, so an engine can
    keep derived data there once (CSM keeps the clip's Mimi codes under ``TURN_CODES``).
    ``pinned`` turns (voice prompts, emotion references) are never dropped to fit.
    """

    speaker: int
    text: str
    audio: np.ndarray | None = None  # 24 kHz mono float32
    cache: dict[str, Any] = field(default_factory=dict)
    pinned: bool = False
    duration: float | None = None  # for a turn restored from its codes alone (a stored session turn)
    words: list[Word] | None = None  # when each word of ``text`` is heard in it (a reply made with timestamps)
    text_s: float | None = None  # a sentence cut off while spoken: how long its whole ``text`` takes to say

    @property
    def duration_s(self) -> float:
        if self.audio is None:
            return self.duration or 0.0
        return len(self.audio) / OUTPUT_RATE  # context audio is CSM's


class SentenceFeed:
    """The sentences of a text still being written (an LLM's answer): an engine speaks each as it arrives.

    The event loop ``put``s sentences and ``close``s the feed (with an error if
    the writer failed); the worker thread iterates ``take``, which waits for the
    next sentence and stops when the task is cancelled.  It can be taken once.
    """

    _END = object()

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting = False  # the engine waits for the next sentence (not stuck: the writer's deadline bounds it)

    def put(self, sentence: str) -> None:
        self._queue.put(sentence)

    def close(self, error: "EngineError | None" = None) -> None:
        self._queue.put(self._END if error is None else error)

    def take(self, cancel: threading.Event) -> Iterator[str]:
        while not cancel.is_set():
            try:
                self.waiting = True
                item = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            self.waiting = False
            if item is self._END:
                return
            if isinstance(item, EngineError):
                raise item
            yield item


@dataclass(eq=False)
class SynthesisTask:
    """One request as an engine sees it: the request, its prompt context, a cancel flag, and an out-list.

    ``context`` comes before the text (voice prompt, then conversation history,
    oldest first); ``reference`` (an emotion clip) goes right before the text.
    The engine appends the turns it speaks to ``produced`` (conversation memory)
    and sets ``truncated`` when the request's ``max_audio_length_ms`` ran out
    before the end of the text.  An engine stopped inside a sentence may leave
    the part of it that went out in ``unfinished``, so that a barge-in keeps
    what was heard of it.  Engines read the text through ``texts()``.
    """

    request: SynthesisRequest
    cancel: threading.Event = field(default_factory=threading.Event)
    context: list[ContextTurn] = field(default_factory=list)
    reference: ContextTurn | None = None
    produced: list[ContextTurn] = field(default_factory=list)
    truncated: bool = False
    feed: SentenceFeed | None = None  # the text arrives while it is spoken (``request.text`` is its beginning)
    unfinished: ContextTurn | None = None  # the sentence a cancel cut off: the frames of it that went out

    def texts(self) -> Iterator[str]:
        """What to speak, in pieces: the request's whole text, or each sentence of the feed as it arrives."""
        if self.feed is None:
            yield self.request.text
        else:
            yield from self.feed.take(self.cancel)


class Engine(ABC):
    """Base class: ``load`` once, then ``synthesize`` many times from worker threads (``concurrency`` at once)."""

    name: str = "engine"
    sample_rate: int = OUTPUT_RATE
    concurrency: int = 1  # requests it may run at once (CSM: its batch rows)
    native_speed: bool = True  # honours ``request.speed`` itself (else the core time-stretches its audio)
    words: str | None = None  # why it gives no word times of its own (None: its marks carry them)
    seedable: bool = False  # the same request with the same seed gives the same audio (so it may be cached)

    @abstractmethod
    def load(self) -> None:
        """Load weights; raise with a human sentence as the message when it cannot."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Static facts for ``/v1/info`` and logs (voice, device, dtype, ...)."""

    @abstractmethod
    def synthesize(self, task: SynthesisTask) -> Iterator["np.ndarray | SentenceMark"]:
        """Yield audio chunks (float32, mono, ``sample_rate``) for ``task.request``, each sentence followed by its
        ``SentenceMark`` (an engine that marks no sentences gets neither progress nor word times)."""

    def languages(self) -> tuple[str, ...] | None:
        """Language codes it speaks (``en``, ``de_DE``); ``None``: it does not say (it gets any request)."""
        return None

    def output_rate(self, request: SynthesisRequest) -> int:
        """The sample rate of the chunks ``synthesize`` will yield for ``request``."""
        return self.sample_rate

    def voice_name(self, request: SynthesisRequest) -> str | None:
        """The voice that answers ``request``, for its reply's metadata."""
        return self.describe().get("voice")

    def recover(self, stalled_for: float) -> None:
        """The watchdog gave up on a request that made no progress for ``stalled_for`` seconds.

        The scheduler replaces its own worker threads; an engine with threads of
        its own (CSM's batch thread) replaces any that have been stuck that long.
        """

    def close(self) -> None:
        """Release what ``load`` took; the default has nothing to release."""
