"""Speaking rate for engines that cannot change it: pitch-preserving time-stretching of the output, as it streams.

Rubber Band (through Spotify's pedalboard) stretches whole buffers, so a stream
is stretched piece by piece: each piece together with the ``CONTEXT`` of audio
before it (the stretcher's start-up falls on audio already sent), and the last
``HOLD`` of each result is held back and cross-faded into the next piece's
version of the same audio (the end of a buffer is where a stretcher differs from
one that goes on).  So the seams do not click, and the stream sounds like one
stretch of the whole file (tests/audio/test_stretch.py compares them).
"""

from __future__ import annotations

import numpy as np

CONTEXT_S = 0.3
HOLD_S = 0.08


class Stretcher:
    def __init__(self, rate: int, speed: float) -> None:
        self.rate, self.speed = rate, speed
        self._history = np.zeros(0, np.float32)  # the last CONTEXT_S of input
        self._held = np.zeros(0, np.float32)  # the last output, not yet sent

    def __call__(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        """The stretched audio of ``samples`` that can be sent now; ``last``: all that is left."""
        if not len(samples):
            if not last:
                return samples
            held, self._held = self._held, np.zeros(0, np.float32)
            return held
        window = np.concatenate([self._history, samples.astype(np.float32, copy=False)])
        out = stretch(window, self.rate, self.speed)
        begin = min(len(out), round(len(self._history) * len(out) / len(window)))  # where the new audio starts
        held, overlap = self._held, min(len(self._held), begin)
        fade = np.linspace(0.0, 1.0, overlap, endpoint=False, dtype=np.float32)
        joined = held[len(held) - overlap:] * (1 - fade) + out[begin - overlap:begin] * fade
        keep = 0 if last else min(round(HOLD_S * self.rate / self.speed), len(out) - begin)
        self._held = out[len(out) - keep:].copy() if keep else np.zeros(0, np.float32)
        self._history = window[-round(CONTEXT_S * self.rate):]
        return np.concatenate([held[:len(held) - overlap], joined, out[begin:len(out) - keep]])


def stretch(audio: np.ndarray, rate: int, speed: float) -> np.ndarray:
    """``audio`` played ``speed`` times as fast, at the same pitch (one buffer)."""
    from pedalboard import time_stretch

    out = time_stretch(audio.astype(np.float32, copy=False)[None, :], float(rate), stretch_factor=float(speed))
    return out[0]
