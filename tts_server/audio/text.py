"""Text helpers for synthesis: sentence splitting and frame budgets.

CSM degrades on long inputs and its positions are finite, so long text is
spoken sentence by sentence, each sentence with the ones before it as context.
"""

from __future__ import annotations

import math
import re
import unicodedata

from .pcm import FRAME_MS

_SENTENCE_END = re.compile(r"(?<=[.!?…;:])[\"')\]]*\s+|\n+")
_PHRASE_END = re.compile(r"(?<=[.!?…;:,])[\"')\]]*\s+|\s+[-–—]+\s+|(?<=[–—])\s*|\n+")
_CLOSERS = "\"')]"  # what a sentence separator takes with it after the punctuation
PHRASE_WORDS = 3  # the fewest words a first phrase may have ("Once upon a time," has four; "Well," waits)
BASE_MS = 1000
MS_PER_CHAR = 80  # ~12 characters per second of speech, with room to spare
MAX_SENTENCE_CHARS = 250  # one generation's text: its prompt and frame budget fit CSM-1B's 2048 positions


def split_sentences(text: str, min_chars: int = 12, max_chars: int = MAX_SENTENCE_CHARS) -> list[str]:
    """Sentences of ``text`` in order; fragments shorter than ``min_chars`` join the next one.

    A sentence longer than ``max_chars`` (a run-on, or text with no punctuation)
    is cut at the last comma or space before the limit, so every piece fits
    CSM's positions and nothing of the text is left unspoken.
    """
    found, carry = _sentences(text, min_chars)
    sentences = [sentence for sentence, _ in found]
    if carry and sentences:
        sentences[-1] = f"{sentences[-1]} {carry}"
    elif carry:
        sentences.append(carry)
    return [piece for sentence in sentences for piece in _wrap(sentence, max_chars)]


def _sentences(text: str, min_chars: int) -> tuple[list[tuple[str, int]], str]:
    """``split_sentences`` before the cut to ``max_chars`` and before a short trailing fragment joins the last
    sentence: the sentences, each with where the text after it starts (past its separator), and that fragment."""
    sentences: list[tuple[str, int]] = []
    carry, start = "", 0
    for match in [*_SENTENCE_END.finditer(text), None]:
        part = text[start:match.start() if match else len(text)].strip()
        start = match.end() if match else len(text)
        if not part:
            continue
        carry = f"{carry} {part}".strip()
        if len(carry) >= min_chars:
            sentences.append((carry, start))
            carry = ""
    return sentences, carry


class SentenceStream:
    """Complete sentences out of text that arrives in pieces (an LLM's reply, a client's text stream), each as soon
    as it can no longer change.

    Exactly ``split_sentences`` of the whole text, however it is cut into
    pieces (mid-word, mid-sentence, mid-number): so a text streamed in is spoken
    as the same generations, with the same seeded audio, as the text sent whole.
    A sentence is released once the text after it holds ``min_chars``
    characters of the next one (a shorter end would join it, as in whole text);
    a run-on is cut at ``max_chars`` without waiting for its end.  ``finish``
    returns what is left when the text is complete.
    """

    def __init__(self, min_chars: int = 12, max_chars: int = MAX_SENTENCE_CHARS, first_phrase: bool = False) -> None:
        """``first_phrase``: the first piece may instead end at a clause (a comma, dash or colon after at least
        ``PHRASE_WORDS`` words) or a sentence, whichever comes first, so that speech can start before a whole
        sentence is written (an LLM's answer: not the same pieces as the whole text); the rest as above."""
        self.min_chars, self.max_chars = min_chars, max_chars
        self._text = ""  # the text not yet released, from the start of a sentence
        self._cut = 0  # pieces of its first sentence already released (a run-on cut at max_chars)
        self._phrase = first_phrase

    @property
    def pending(self) -> str:
        """The text not yet released."""
        return " ".join(split_sentences(self._text, self.min_chars, self.max_chars)[self._cut:])

    def add(self, chunk: str) -> list[str]:
        self._text += chunk
        done: list[str] = []
        if self._phrase and (phrase := _first_phrase(self._text)):
            done.extend(_wrap(self._text[:phrase].strip(), self.max_chars))
            self._text, self._phrase = self._text[phrase:], False
        # closing quotes at the end may yet go to a separator (a sentence then shorter): decided without them
        sentences, _ = _sentences(self._text.rstrip(_CLOSERS), self.min_chars)
        for sentence, _ in sentences[:-1]:  # each followed by a whole sentence: final
            done.extend(_wrap(sentence, self.max_chars)[self._cut:])
            self._cut = 0
        if len(sentences) > 1:
            self._text = self._text[sentences[-2][1]:]
        if sentences:  # the last may still grow or take a short end, but its cuts before its last piece are final
            pieces = _wrap(sentences[-1][0], self.max_chars)[:-1]
            done.extend(pieces[self._cut:])
            self._cut = max(self._cut, len(pieces))
        if done:
            self._phrase = False
        return done

    def finish(self) -> list[str]:
        rest = split_sentences(self._text, self.min_chars, self.max_chars)[self._cut:]
        self._text, self._cut = "", 0
        return rest


def _first_phrase(text: str) -> int | None:
    """Where the first clause or sentence of ``text`` ends (after its trailing space), if it has at least
    ``PHRASE_WORDS`` words; else None."""
    for match in _PHRASE_END.finditer(text):
        if len(text[:match.start() + 1].split()) >= PHRASE_WORDS:
            return match.end()
    return None


def _wrap(sentence: str, max_chars: int) -> list[str]:
    pieces = []
    while len(sentence) > max_chars:
        head = sentence[:max_chars]
        cut = max(head.rfind(", "), head.rfind("; "))  # a clause boundary in the second half,
        cut = cut + 1 if cut >= max_chars // 2 else head.rfind(" ")  # else the last space,
        if cut < max_chars // 2:
            cut = max_chars  # else a hard cut
        pieces.append(sentence[:cut].strip())
        sentence = sentence[cut:].strip()
    return pieces + ([sentence] if sentence else [])


def speakable(text: str) -> bool:
    """Whether ``text`` has anything to say: a letter or a digit.  Punctuation, symbols and spaces alone ("—",
    "?!") are not spoken (Piper makes no audio of them), so such a text is refused, on every interface alike."""
    return any(unicodedata.category(char)[0] in "LN" for char in text)


def estimate_ms(text: str) -> int:
    """A generous upper bound on how long ``text`` takes to say."""
    return BASE_MS + MS_PER_CHAR * len(text)


SPOKEN_CHARS_PER_S = 15  # a typical English speaking rate (~150 words a minute), spaces and punctuation counted


def spoken_s(text: str) -> float:
    """About how long ``text`` takes to say (unlike ``estimate_ms``, not an upper bound): the share of a sentence's
    words heard in its first seconds, when it was cut off before its end."""
    return len(text) / SPOKEN_CHARS_PER_S


def frames_for_ms(ms: float) -> int:
    return max(1, math.ceil(ms / FRAME_MS))


def place_words(words: list[str], pieces: list[tuple[str, float, float]]) -> list[tuple[float, float]]:
    """Times for ``words`` (a text split on whitespace) from timed ``pieces`` of the same text (an aligner's
    tokens), matched by character position with whitespace ignored: a word spans the pieces its characters fall in.
    A word no piece covers gets the previous word's end (zero length).  Times never go backwards."""
    ends, position = [], 0
    for piece, start, end in pieces:
        position += len("".join(piece.split()))
        ends.append((position, start, end))
    times: list[tuple[float, float]] = []
    cursor, index, last = 0, 0, 0.0
    for word in words:
        first, cursor = cursor, cursor + len(word)
        span: list[tuple[float, float]] = []
        while index < len(ends) and ends[index][0] <= first:  # pieces wholly before this word
            index += 1
        probe = index
        while probe < len(ends):
            span.append(ends[probe][1:])
            if ends[probe][0] >= cursor:
                break
            probe += 1
        index = probe
        start = max(last, span[0][0]) if span else last
        end = max(start, span[-1][1]) if span else start
        times.append((start, end))
        last = start if not span else end
    return times


# Words an English sentence does not end on: "I'd like to...", "a table for...", "bread and..."
_GOES_ON = frozenset("""a an the and or but so because if when while than then that which who whose to of for from
with without in on at by into onto about as like my your his her its our their this these those some any every
no not i we you he she they it's i'm is are was were be been am will would could should can may might must do does
did have has had just very really more most um uh er""".split())


def reads_unfinished(text: str, language: str | None = "en") -> bool:
    """Whether a transcript reads as a sentence cut off: it trails off (a comma, dash or ellipsis), or (English)
    it ends on a word no sentence ends on unless it asks ("to", "and", "the", ...).  The transcriber writes the
    punctuation it hears, so a finished sentence ends in '.', '?' or '!'."""
    text = text.strip()
    if not text:
        return False
    if text.endswith((",", "...", "…", "-", "–", "—", ";", ":")):
        return True
    if text.endswith(("?", "!")) or (language or "en") != "en":
        return False
    last = text.rstrip(".").split()[-1].lower().strip("\"'()[]") if text.rstrip(".").split() else ""
    return last in _GOES_ON
