"""Text helpers for synthesis: sentence splitting and frame budgets.

CSM degrades on long inputs and its positions are finite, so long text is
spoken sentence by sentence, each sentence with the ones before it as context.
"""

from __future__ import annotations

import math
import re

_SENTENCE_END = re.compile(r"(?<=[.!?…;:])[\"')\]]*\s+|\n+")
FRAME_MS = 80  # one CSM / Mimi frame
BASE_MS = 1000
MS_PER_CHAR = 80  # ~12 characters per second of speech, with room to spare


def split_sentences(text: str, min_chars: int = 12) -> list[str]:
    """Sentences of ``text`` in order; fragments shorter than ``min_chars`` join the next one."""
    parts = [p.strip() for p in _SENTENCE_END.split(text) if p and p.strip()]
    sentences: list[str] = []
    carry = ""
    for part in parts:
        carry = f"{carry} {part}".strip()
        if len(carry) >= min_chars:
            sentences.append(carry)
            carry = ""
    if carry:
        if sentences:
            sentences[-1] = f"{sentences[-1]} {carry}"
        else:
            sentences.append(carry)
    return sentences


def estimate_ms(text: str) -> int:
    """A generous upper bound on how long ``text`` takes to say."""
    return BASE_MS + MS_PER_CHAR * len(text)


def frames_for_ms(ms: float) -> int:
    return max(1, math.ceil(ms / FRAME_MS))
