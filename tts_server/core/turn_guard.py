"""A connection's limits on the other side's streamed audio: how fast it may arrive, how long a turn may stay open.

Every frame of a streamed turn or of hands-free listening is checked against the
connection's ``AudioPace`` (``core.pacing``) on the event loop, before any work
is queued for it: a frame beyond the pace is refused with ``rate_limited`` and
the turn (or the listening) it was for is dropped, so a flood costs the shared
turn-encoding thread nothing.  The allowance belongs to the connection, not to
a turn: a new ``turn_start`` does not refill it.

A turn, or a hands-free utterance, that stays open longer than
``TurnEncoding.turn_timeout`` seconds of wall-clock time (``MAX_TURN_SECONDS`` and a
margin: the client stopped sending, or sends far slower than real time) is
dropped with ``client_too_slow`` and its buffers freed; a listener with no
utterance open, or a connection with no turn, may idle as long as it likes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from ..engines.errors import ErrorCode, Refusal
from .events import Failed
from .pacing import AudioPace


class TurnGuard:
    def __init__(self, pace: AudioPace, timeout: float) -> None:
        self.pace, self.timeout = pace, timeout
        self._timer: asyncio.TimerHandle | None = None

    def check(self, size: int, rate: int, dropped: str) -> None:
        """A frame of ``size`` bytes of 16-bit PCM at ``rate``: raise ``rate_limited`` (saying ``dropped``: what
        was dropped for it) when it runs past the pace."""
        if not self.pace.take(size / 2 / rate, time.monotonic()):
            raise Refusal(ErrorCode.RATE_LIMITED, f"Audio is arriving faster than real time: a connection may send "
                                                  f"{self.pace.burst:g} s of audio ahead of the clock, then "
                                                  f"{self.pace.speed:g} s a second; {dropped}")

    def open(self, overstayed: Callable[[], None]) -> None:
        """A turn or an utterance opened: ``overstayed()`` is called after the timeout unless ``close`` comes
        first (on the event loop)."""
        self.close()
        self._timer = asyncio.get_running_loop().call_later(self.timeout, overstayed)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def overstayed_reply(self, what: str, after: str) -> Failed:
        return Failed(ErrorCode.CLIENT_TOO_SLOW, f"{what} stayed open longer than {self.timeout:g} s (its "
                                                   f"audio stopped, or came far slower than real time); {after}")
