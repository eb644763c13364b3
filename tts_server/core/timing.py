"""Word times and progress of one run: where each sentence sits in the reply's audio, and when its words are heard.

``generate`` tells a ``Timing`` how much engine audio it has taken (``took``)
and hands it each ``SentenceMark``.  A mark's words are placed at the
sentence's offset in the output (scaled when the core time-stretches the
audio); a mark without words (CSM) is aligned on the aligner's thread, off the
generation thread, so generation never waits for it.  ``due`` gives the words
whose audio has been sent; an alignment that ends while the audio is already out
sends its words at once (``post``); ``rest`` waits for the alignments still
running.  Callers hold ``lock`` around ``mark``, ``due`` and sending audio, so a
word is never posted before the audio that holds it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import Any, Callable

from ..audio.text import split_sentences
from ..engines.base import Engine, SentenceMark, Word

# align(owner, audio, rate, text) -> words, run on the aligner's own thread in ``owner``'s turn (the job's
# connection: ``fair.FairThread``); it raises when the alignment cannot be queued; None: no aligner on this server
Aligner = Callable[[Any, Any, int, str], "concurrent.futures.Future[list[Word]]"]


class Timing:
    def __init__(self, job, engine: Engine, aligner: Aligner | None, stretched: bool,
                 post: Callable[[list[Word]], None] | None = None, sent_s: Callable[[], float] | None = None) -> None:
        request = job.request
        self._job = job
        self.lock = threading.RLock()  # re-entered when an alignment is already done as it is added
        self._post, self._sent_s = post, sent_s
        self.engine_rate = engine.output_rate(request)
        self.scale = 1 / request.speed if stretched else 1.0  # output seconds per engine second
        self.wanted = request.timestamps
        self.total = None if job.task.feed is not None else len(split_sentences(request.text))
        self.aligner = aligner if engine.words is not None else None
        self.reason = None
        if self.wanted and engine.words is not None and aligner is None:
            self.reason = engine.words
        self.taken = 0  # engine samples so far
        self.sentence_start = 0
        self.sentences = 0
        self.words: list[Word] = []  # placed, in order
        self.by_sentence: list[list[Word]] = []  # each sentence's words, from its own start, unstretched
        # the request's words (the text split on whitespace): a word a sentence piece cut in two is given whole
        self._text_words = request.text.split() if job.task.feed is None else None
        self._word = 0  # the request word the next placed word belongs to
        self._part: Word | None = None  # the start of a word cut in two, until its end arrives
        self._sent = 0  # how many of them have gone out
        self._aligning: collections.deque = collections.deque()  # (future of words, sentence offset_s), in order

    def took(self, samples: int) -> None:
        self.taken += samples

    def mark(self, mark: SentenceMark) -> dict[str, Any]:
        """A sentence ended: place (or start aligning) its words; the progress it makes."""
        offset = self.sentence_start / self.engine_rate * self.scale
        self.sentence_start = self.taken
        self.sentences += 1
        if self.wanted and self.reason is None:
            if mark.words is not None:
                self._aligning.append((_done(mark.words), offset))
            elif self.aligner is not None and mark.audio is not None:
                try:
                    future = self.aligner(self._job.owner, mark.audio, self.engine_rate, mark.text)
                except Exception as exc:  # not ready, gone, or too far behind: no words, said why
                    self.reason = str(exc)
                else:
                    self._job.attach(future)  # dropped the moment the job ends
                    self._aligning.append((future, offset))
                    if self._post is not None:
                        future.add_done_callback(self._aligned)
            else:
                self.reason = "this engine gives no word times"
            self._settle()
        return {"sentence": self.sentences, "sentences": self.total,
                "audio_s": round(self.taken / self.engine_rate * self.scale, 3)}

    def _aligned(self, _future) -> None:
        """An alignment ended (on the aligner's thread): its words whose audio is out go now."""
        if _future.cancelled() or self._job.cancel_event.is_set():  # dropped: the job ended, nobody wants them
            return
        with self.lock:
            found = self.due(self._sent_s())
        if found:
            self._post(found)

    def due(self, sent_s: float) -> list[Word]:
        """Words whose audio has all been sent (``sent_s`` seconds of output), not given before."""
        self._settle()
        ready = self._sent
        while ready < len(self.words) and self.words[ready].end_s <= sent_s + 1e-6:
            ready += 1
        out, self._sent = self.words[self._sent:ready], ready
        return out

    def unfinished(self) -> list:
        """The alignments still waiting or running."""
        return [future for future, _ in list(self._aligning) if not future.done()]

    def wait(self) -> None:
        """Wait for the alignments still running (without ``lock``: their callbacks take it); the scheduler waits
        for ``unfinished`` ones on the loop first, so this worker is not held for them."""
        concurrent.futures.wait([future for future, _ in list(self._aligning)])

    def rest(self, duration_s: float) -> list[Word]:
        """At the end, after ``wait``: every word not given yet, inside the audio."""
        self._settle(wait=True)
        if self._part is not None:  # the reply stopped inside a word: its part that was said
            self.words.append(self._part)
            self._part = None
        out, self._sent = self.words[self._sent:], len(self.words)
        return [Word(w.word, min(w.start_s, duration_s), min(w.end_s, duration_s)) for w in out]

    def _settle(self, wait: bool = False) -> None:
        while self._aligning and (wait or self._aligning[0][0].done()):
            future, offset = self._aligning.popleft()
            try:
                words = future.result()
            except Exception as exc:  # the aligner failed: no words, said why (the audio is fine)
                self.reason, self._aligning = f"word alignment failed: {exc}", collections.deque()
                return
            self.by_sentence.append(words)
            for word in words:
                self._place(word.shifted(offset, self.scale))

    def _place(self, placed: Word) -> None:
        """One word of a sentence, at its place in the reply; a piece of a longer request word (a sentence cut
        inside a word) waits for the rest, so word times are always the request's whitespace-separated words."""
        last = self._part.end_s if self._part else self.words[-1].end_s if self.words else 0.0
        word = Word(placed.word, max(last, placed.start_s), max(last, placed.end_s))
        if self._part is not None:
            word = Word(self._part.word + word.word, self._part.start_s, word.end_s)
        whole = self._text_words[self._word] if self._text_words and self._word < len(self._text_words) else None
        if whole is not None and word.word != whole and whole.startswith(word.word):
            self._part = word  # the word goes on in the next sentence
            return
        self._part = None
        self._word += 1
        self.words.append(word)

    def unavailable(self) -> str | None:
        """Why the reply has no words though they were asked for (``success``'s ``words_unavailable``)."""
        return self.reason if self.wanted and self.reason else None


def _done(words: list[Word]) -> "concurrent.futures.Future[list[Word]]":
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_result(words)
    return future
