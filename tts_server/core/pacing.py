"""How fast a connection may send the audio of its streamed turns: a token bucket counted in seconds of audio.

A microphone produces audio in real time, so a client that sends much faster is
replaying a file or flooding the one turn-encoding thread (the VAD and the
codec run on it for every user).  The bucket holds up to ``burst`` seconds of
audio and refills at ``speed`` seconds per second: a client may run
``AUDIO_BURST_SECONDS`` ahead of the clock (network jitter, a stall of the
server's own thread that lets frames pile up, audio buffered before the socket
opened), and then keep up a pace of ``AUDIO_SPEED`` times real time.  A frame
that does not fit is refused whole and costs nothing, so its size is checked
before any work is spent on it (one 16 MiB frame at 8 kHz is 17 minutes).
Pure: the caller passes the clock.
"""

from __future__ import annotations

AUDIO_BURST_SECONDS = 20.0
AUDIO_SPEED = 1.25


class AudioPace:
    def __init__(self, burst_seconds: float = AUDIO_BURST_SECONDS, speed: float = AUDIO_SPEED,
                 now: float | None = None) -> None:
        self.burst, self.speed = burst_seconds, speed
        self._level = burst_seconds  # seconds of audio that may arrive now
        self._at = now

    def take(self, seconds: float, now: float) -> bool:
        """Whether ``seconds`` of audio arriving at ``now`` (seconds, monotonic) are within the pace; only taken
        audio counts."""
        if self._at is not None and now > self._at:
            self._level = min(self.burst, self._level + (now - self._at) * self.speed)
        self._at = now if self._at is None else max(self._at, now)
        if seconds > self._level:
            return False
        self._level -= seconds
        return True
