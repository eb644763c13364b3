"""Speech recognition: the other side's turns sent without text, and word times of engines that give none.

One transcriber (``--stt-model``) serves the whole server on one thread, shared
fairly (``fair.FairThread``): each connection's transcriptions take their turn,
one item each, beside each reply's alignments.  It loads in the background;
a turn that needs it meanwhile waits, and one sent to a server without it (or
whose model failed) is refused with the reason.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Hashable

import numpy as np

from ..audio.pcm import OUTPUT_RATE
from ..engines.errors import ErrorCode, Refusal
from ..engines.stt import Transcriber
from .fair import SERVER, Dropped, FairThread, Full

log = logging.getLogger(__name__)
# What one connection may have waiting: its reader awaits its own turns, so a client is refused only if it floods.
TRANSCRIPTS_WAITING = 4
# A reply's sentences waiting for word times beyond this get none (``words_unavailable`` says why).
ALIGNMENTS_WAITING = 64


class SpeechRecognition:
    def __init__(self, stt: Transcriber | None, admitted: Callable[[Hashable], bool],
                 on_dropped: Callable[[int], None] = lambda count: None, language: str | None = None) -> None:
        """``language`` (``--stt-language``): what every speaker speaks; None: learnt from each conversation's
        first turn."""
        self.stt, self.failure, self.language = stt, None, language
        self._admitted = admitted
        self.loaded = asyncio.Event()  # set once loading ended, loaded or failed
        self.thread = FairThread("stt", TRANSCRIPTS_WAITING, on_dropped)

    @property
    def state(self) -> str:
        """For ``/v1/info``: off, loading, ready or failed."""
        if self.stt is None:
            return "off"
        return "failed" if self.failure else "ready" if self.loaded.is_set() else "loading"

    async def load(self) -> None:
        try:
            if self.stt is not None:
                await asyncio.to_thread(self.stt.load)
        except Exception as exc:  # the server serves on; turns without text are refused with the reason
            self.failure = str(exc) or exc.__class__.__name__
            log.error("Speech recognition unavailable: %s", self.failure)
        finally:
            self.loaded.set()

    def align(self, owner: Hashable, audio, rate: int, text: str):
        """Word times of ``audio`` saying ``text`` (CSM's sentences) on the transcriber's thread, in the turn of
        ``owner``'s replies (their own turn, beside the connection's transcriptions); from any thread."""
        if not self.loaded.is_set() or self.failure is not None:
            raise RuntimeError(f"the aligner (--stt-model) is {'unavailable' if self.failure else 'loading'}")
        try:
            return self.thread.submit_for(("words", owner), self.stt.align, audio, rate, text,
                                          limit=ALIGNMENTS_WAITING)
        except Full:
            raise RuntimeError(f"word alignment fell behind: {ALIGNMENTS_WAITING} sentences were already waiting "
                               "for the aligner") from None

    def refuse_without(self) -> None:
        """Refuse a turn without text now, before its audio is sent, on a server with no speech recognition."""
        if self.stt is None:
            raise Refusal(ErrorCode.INVALID_REQUEST, "'text' is required: this server has no speech recognition "
                                                     "(start it with --stt-model)")

    async def hear(self, audio: np.ndarray | None, rate: int = OUTPUT_RATE, connection: Hashable | None = None,
                   language: str | None = None) -> tuple[str, str | None]:
        """What was said in a turn sent without text (float audio at ``rate``), on the transcriber's thread in
        ``connection``'s turn (without speech recognition, the refusal): in ``language`` when it is known, with the
        language it was heard in (learnt there when it was not: a conversation detects its speaker's language once,
        then transcribes faster).  The text is empty if no speech was recognised (``no_speech`` is the refusal)."""
        self.refuse_without()
        await self.loaded.wait()
        if self.failure is not None:
            raise Refusal(ErrorCode.MODEL_UNAVAILABLE, f"Speech recognition is unavailable: {self.failure}")
        if connection is not None and not self._admitted(connection):
            raise Dropped("its connection closed")
        try:
            text, language = await self.thread.run(SERVER if connection is None else connection,
                                                   self.stt.recognize, audio, rate, language,
                                                   limit=TRANSCRIPTS_WAITING)
        except Full:
            raise Refusal(ErrorCode.BUSY, f"{TRANSCRIPTS_WAITING} turns of this connection are already waiting to "
                                          "be transcribed; send the next once one is saved") from None
        return text, language


def no_speech() -> Refusal:
    return Refusal(ErrorCode.INVALID_REQUEST, "No speech was recognized in the turn: send its 'text'; the turn was "
                                              "dropped")
