"""Captions of spoken text from its word times: WebVTT and SubRip (SRT).

Words are grouped into cues the way subtitle guidelines suggest: a cue ends
after a sentence's last word, before a pause, or when it would grow past
``MAX_WORDS`` words or ``MAX_SECONDS`` on screen.  Cue text is escaped as each
format needs (``vtt_text``, ``srt_text``): a spoken text never becomes markup or a
timing line.  A cue is one line (words never hold whitespace).  Pure text formatting.
"""

from __future__ import annotations

from typing import Iterable

MAX_WORDS = 8
MAX_SECONDS = 4.0
PAUSE_S = 0.4
SENTENCE_END = (".", "!", "?", "…", ":", ";")


def cues(words: Iterable) -> list[tuple[float, float, str]]:
    """(start_s, end_s, text) of each cue; ``words`` have ``word``, ``start_s``, ``end_s`` (objects or dicts)."""
    out: list[tuple[float, float, str]] = []
    current: list = []
    for word in map(_fields, words):
        if current and (len(current) >= MAX_WORDS or word[1] - current[0][1] > MAX_SECONDS
                        or word[1] - current[-1][2] > PAUSE_S):
            out.append(_cue(current))
            current = []
        current.append(word)
        if word[0].rstrip("\"')]").endswith(SENTENCE_END):
            out.append(_cue(current))
            current = []
    if current:
        out.append(_cue(current))
    return out


def vtt(words: Iterable) -> str:
    body = "".join(f"{i}\n{_time(s, '.')} --> {_time(e, '.')}\n{vtt_text(text)}\n\n" for i, (s, e, text) in
                   enumerate(cues(words), 1))
    return "WEBVTT\n\n" + body


def srt(words: Iterable) -> str:
    return "".join(f"{i}\n{_time(s, ',')} --> {_time(e, ',')}\n{srt_text(text)}\n\n" for i, (s, e, text) in
                   enumerate(cues(words), 1))


def vtt_text(text: str) -> str:
    """Cue text as WebVTT requires: ``&``, ``<`` and ``>`` as character references, so no word is read as a tag,
    a timestamp or an entity, and no line holds ``-->`` (a line with it would end the cue and forge a timing)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def srt_text(text: str) -> str:
    """Cue text for SubRip, which has no escapes (players show ``&lt;`` as typed) yet reads ``<b>``-style tags and
    ``{\\...}`` overrides: an invisible word joiner (U+2060) after each ``<`` and ``{`` and inside each ``-->``
    keeps every word visible as typed, not read as markup or a timing line."""
    return text.replace("<", "<\u2060").replace("{", "{\u2060").replace("-->", "--\u2060>")


def _fields(word) -> tuple[str, float, float]:
    if isinstance(word, dict):
        return word["word"], float(word["start_s"]), float(word["end_s"])
    return word.word, float(word.start_s), float(word.end_s)


def _cue(words: list[tuple[str, float, float]]) -> tuple[float, float, str]:
    # a cue is on screen at least until its last word ends, and never for no time at all
    return words[0][1], max(words[-1][2], words[0][1] + 0.001), " ".join(w[0] for w in words)


def _time(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"
