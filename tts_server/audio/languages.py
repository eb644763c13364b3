"""Language codes: which of an engine's languages answers a request's ``language``.

Codes are ISO 639 with an optional region, written ``en``, ``en_US`` or
``en-us`` alike.  A request matches a language exactly (region included) first,
else by its language alone: ``en_GB`` is answered by ``en_US`` when no British
voice exists, ``de`` by ``de_DE``, and an engine that speaks ``en`` answers any
English.  Pure functions, no I/O.
"""

from __future__ import annotations

from typing import Iterable, Sequence


def normalize(code: str) -> str:
    """``en-us`` -> ``en_US``; ``DE`` -> ``de``."""
    parts = code.replace("-", "_").split("_")
    return "_".join([parts[0].lower(), *(part.upper() if len(part) == 2 else part for part in parts[1:])])


def base(code: str) -> str:
    return normalize(code).split("_")[0]


def pick(wanted: str, available: Sequence[str]) -> int | None:
    """Index of the language in ``available`` that best answers ``wanted``, or ``None``."""
    target = normalize(wanted)
    codes = [normalize(code) if code else "" for code in available]
    if target in codes:
        return codes.index(target)
    for index, code in enumerate(codes):
        if code and base(code) == base(target):
            return index
    return None


def speaks(languages: Iterable[str] | None, wanted: str | None) -> bool:
    """Whether an engine with ``languages`` (``None``: it does not say, so any) can answer ``wanted``."""
    if wanted is None or languages is None:
        return True
    return pick(wanted, list(languages)) is not None
