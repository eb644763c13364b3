"""A reply whose text arrives in pieces: the one mechanism behind a client's text stream (the WebSocket's
``text_stream``) and the chat model's answer (``core.respond``).

The pieces go through a ``SentenceStream`` into the job's ``SentenceFeed``,
which the engine speaks with one decoder across sentences (no seams).  Without
``first_phrase`` the sentences are exactly those of the whole text, so a text
streamed in any pieces gives the whole text's seeded audio; a ``flush`` speaks
what is pending at once (the client has decided where a sentence ends, as
Pipecat does).  The job is queued when its first sentence is complete, not
before: no engine worker waits while nothing speakable has arrived.  A stream
that completes no sentence and does not end for its ``timeout`` fails
(``text_timeout``): a silent or trickling writer holds an engine worker at most
that long.  Pure bookkeeping on the event loop; the engine reads the feed on
its worker thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Callable

from ..audio.text import SentenceStream, speakable
from ..engines.base import EngineError, SentenceFeed
from ..engines.errors import ErrorCode, Refusal
from .events import Cancelled, failed
from .jobs import Job


class StreamedText:
    """The text of ``job`` as it is written; ``submit`` queues the job (it may raise ``Refusal``)."""

    def __init__(self, job: Job, submit: Callable[[Job], None], max_chars: int, timeout: float,
                 first_phrase: bool = False) -> None:
        self.job, self.submit = job, submit
        self.max_chars, self.timeout = max_chars, timeout
        self.feed = job.task.feed = SentenceFeed()
        self.sentences = SentenceStream(first_phrase=first_phrase)
        self.written: list[str] = []
        self.chars = 0
        self.queued = False  # the first sentence is complete and the job in line
        self.ended = False  # no more text: ended, failed, or its job finished
        self.complete = False  # ended by its writer (``end``)
        self.deadline = time.monotonic() + timeout  # the last complete sentence plus the timeout

    @property
    def room(self) -> int:
        return self.max_chars - self.chars

    @property
    def open(self) -> bool:
        return not (self.ended or self.job.finished or self.job.cancel_event.is_set())

    def add(self, delta: str, flush: bool = False) -> None:
        """The next piece (at most ``room`` characters: the caller cuts or refuses longer ones); with ``flush``,
        what is pending is spoken now, as if the text ended here."""
        if not self.open:
            return
        self.written.append(delta)
        self.chars += len(delta)
        self._speak(self.sentences.add(delta) + (self.sentences.finish() if flush else []))

    def end(self, empty: Refusal | None = None) -> None:
        """The text is complete: the rest is spoken.  A stream that had nothing to speak fails with ``empty``, by
        default as a request with blank text does (``invalid_request``)."""
        self.complete = True
        if not self.open:
            return self.close()
        text = "".join(self.written).strip()
        if not self.queued and not speakable(text):
            return self.fail(empty or Refusal(ErrorCode.INVALID_REQUEST, "The text stream ended with nothing to "
                                                                         "speak: it needs a letter or a digit"))
        self._speak(self.sentences.finish())
        self.job.request = dataclasses.replace(self.job.request, text=text or self.job.request.text)
        self.close()

    def fail(self, refusal: Refusal) -> None:
        """End it with ``refusal`` (its ``error`` is the job's terminal reply, after any audio already made)."""
        self.close(EngineError(refusal.code, refusal.message))
        if not self.queued:
            self.job.finish(failed(Refusal(refusal.code, refusal.message, self.job.request_id)))

    def close(self, error: EngineError | None = None) -> None:
        """No more text, however it ended: the engine is not left waiting (after an error, it reads that first);
        a job cancelled before its first sentence is answered ``cancelled``."""
        if not self.ended:
            self.ended = True
            self.feed.close(error)
        if self.job.cancel_event.is_set() and not self.job.started:
            self.job.finish(Cancelled(self.job.request_id))

    async def watch(self) -> None:
        """Fail the stream once it has completed no sentence for ``timeout`` seconds (a client's text stream; the
        chat model's answer is watched where its stream is read)."""
        while self.open:
            left = self.deadline - time.monotonic()
            if left <= 0:
                return self.fail(Refusal(ErrorCode.TEXT_TIMEOUT, f"The text stream completed no sentence for "
                                                                 f"{self.timeout:g} s and was not ended"))
            await asyncio.sleep(min(left, 1.0))

    def _speak(self, sentences: list[str]) -> None:
        """Complete sentences to the engine; one with no letter or digit (a flushed "?!") has nothing to say."""
        sentences = [sentence for sentence in sentences if speakable(sentence)]
        if not sentences:
            return
        self.deadline = time.monotonic() + self.timeout
        for sentence in sentences:
            self.feed.put(sentence)
        if not self.queued:
            self.queued = True
            self.job.request = self.job.task.request = dataclasses.replace(self.job.request, text=sentences[0])
            try:
                self.submit(self.job)
            except Refusal as exc:  # the queue refused it
                self.close(EngineError(exc.code, exc.message))
                self.job.finish(failed(Refusal(exc.code, exc.message, self.job.request_id)))

