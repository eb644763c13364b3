"""A hands-free utterance transcribed while it is spoken: a piece at each pause, so that at its end little is left.

Whisper's cost grows with the audio it hears (``Transcriber.recognize`` sizes
its window to the clip), so transcribing the whole utterance after it ends makes
the speaker wait for all of it.  Instead, at each pause the VAD reports, the
audio since the previous pause is transcribed, in order, on the recogniser's
thread; a pause is a natural boundary (no word is cut in two).  If the pause
was the end, every word is already being transcribed; if the speaker goes on,
that piece stands and the next one starts there.  The utterance's text is the
pieces' texts joined.  A piece that fails makes the caller transcribe the whole.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import numpy as np


class Pieces:
    def __init__(self, transcribe: Callable[[np.ndarray], Awaitable[str | None]]) -> None:
        """``transcribe``: a piece's text, "" if nothing was said in it, None if it could not be transcribed."""
        self._transcribe = transcribe
        self._texts: list[asyncio.Future] = []
        self._cut = 0  # samples of the utterance already handed out as pieces
        self.speaking = True  # speech came after the last piece (the rest is not only silence)

    def add(self, heard: np.ndarray) -> None:
        """At a pause: ``heard``, the utterance so far; the piece since the previous pause is transcribed after
        the pieces before it (in order: the language learnt from the first serves the rest)."""
        piece = heard[self._cut:]
        self._cut, self.speaking = len(heard), False
        if len(piece) == 0:  # a second pause in the same frame of audio: that frame went to the piece before
            return
        previous = self._texts[-1] if self._texts else None
        self._texts.append(asyncio.ensure_future(self._after(previous, piece)))

    async def _after(self, previous: asyncio.Future | None, piece: np.ndarray) -> str | None:
        if previous is not None:
            await asyncio.wait({previous})
        return await self._transcribe(piece)

    def resumed(self) -> None:
        """The speaker went on after the pause: what follows is the next piece."""
        self.speaking = True

    async def so_far(self) -> str | None:
        """The pieces' text so far (None if one failed or was dropped).  Waiting is not owning: a waiter that is
        cancelled (an answer begun on them, dropped at a resume) leaves the pieces running for the others."""
        pieces = list(self._texts)
        if pieces:
            await asyncio.wait(pieces)
        texts = [None if piece.cancelled() or piece.exception() is not None else piece.result() for piece in pieces]
        if any(text is None for text in texts):
            return None
        return " ".join(text for text in texts if text)

    async def text(self, whole: np.ndarray) -> str | None:
        """At the end (``whole``: the whole utterance): the pieces' text, with the rest transcribed if speech came
        after the last pause; None if a piece failed or nothing was recognised (the caller transcribes the whole,
        and tells why)."""
        if self.speaking and len(whole) > self._cut:
            self.add(whole)
        return await self.so_far() or None

    def drop(self) -> None:
        """Not wanted (the utterance was dropped): pieces still waiting are cancelled."""
        for text in self._texts:
            text.cancel()
