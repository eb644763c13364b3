"""Piper's word times, exact: from its phoneme alignments back to the words of the text.

With ``include_alignments`` each Piper chunk lists its phonemes and how many
samples each one lasted; words are the runs of phonemes between the word-gap
phoneme ``" "`` (and the sentence's ``^`` / ``$``).  A text word may make zero
phoneme words ("—"), one, or several ("42" is "forty two"): each word is
phonemized alone to count them.  A punctuation phoneme's pause does not make
its word last longer.  If the counts disagree with the sentence (context changed
a pronunciation), words take the phoneme words in proportion.
"""

from __future__ import annotations

import string
from typing import Callable

from .base import Word

GAPS = ("^", "$", " ")
PUNCTUATION = set(string.punctuation) | set("…¡¿—–")


def phoneme_words(chunks, rate: int) -> list[tuple[float, float]] | None:
    """(start, end) in seconds of every phoneme word of ``chunks`` (Piper ``AudioChunk``s, one after another)."""
    spans: list[tuple[float, float]] = []
    offset = 0
    for chunk in chunks:
        if chunk.phoneme_alignments is None:
            return None
        position, current = offset, None
        for aligned in chunk.phoneme_alignments:
            samples = int(aligned.num_samples)
            if aligned.phoneme in GAPS:
                if current is not None:
                    spans.append(current)
                current = None
            elif aligned.phoneme not in PUNCTUATION:
                current = (current[0] if current else position, position + samples)
            position += samples
        if current is not None:
            spans.append(current)
        offset += len(chunk.audio_float_array)
    return [(start / rate, end / rate) for start, end in spans]


def word_times(words: list[str], spans: list[tuple[float, float]], phonemize: Callable[[str], list]) -> list[Word]:
    """Each of ``words`` with the span of the phoneme words it made."""
    counts = [sum(1 for group in " ".join("".join(s) for s in phonemize(word)).split(" ")
                  if group.strip(" ".join(PUNCTUATION))) for word in words]
    total = sum(counts)
    if total != len(spans) and spans:  # context changed a pronunciation: share the phoneme words in proportion
        weights = [max(c, 1) for c in counts]
        total, cumulative, counts = sum(weights), 0, []
        for weight in weights:
            first = cumulative * len(spans) // total
            cumulative += weight
            counts.append(max(0, cumulative * len(spans) // total - first))
    placed, index, last = [], 0, 0.0
    for word, count in zip(words, counts):
        mine = spans[index:index + count]
        index += count
        start = max(last, mine[0][0]) if mine else last
        end = max(start, mine[-1][1]) if mine else start
        placed.append(Word(word, round(start, 3), round(end, 3)))
        last = end
    return placed
