"""A turn of the other side that arrives while they speak: 16-bit PCM frames in, CSM's codes out as it comes.

Each binary frame is resampled to 24 kHz (a stateful resampler: no seams) and
whole 80 ms frames are encoded at once (``MimiStreamEncoder``), so when the
speaker stops only the last fraction of a frame is left to encode: the wait for
``turn_saved`` does not grow with the turn.  The calls block (model compute):
the WebSocket runs them on the turn-encoding thread, one piece at a time.
"""

from __future__ import annotations

import numpy as np
import torch

from ..audio.codec import Resampler
from ..engines.base import ContextTurn
from . import replies as r

MAX_TURN_SECONDS = 120  # a streamed turn longer than this is refused (the user's side of a dialogue, not a podcast)


class StreamedTurn:
    def __init__(self, speaker: int, sample_rate: int, encoder) -> None:
        self.speaker, self.sample_rate = speaker, sample_rate
        self._resample = Resampler(sample_rate, 24000)
        self._encoder = encoder
        self._odd = b""  # a byte of a sample split across two frames
        self.received = 0  # samples at the client's rate
        self._audio: list[np.ndarray] = []  # at 24 kHz, for speech recognition when the turn ends without text

    def feed(self, pcm: bytes) -> None:
        data, self._odd = self._odd + pcm, b""
        if len(data) % 2:
            data, self._odd = data[:-1], data[-1:]
        self.received += len(data) // 2
        if self.received > MAX_TURN_SECONDS * self.sample_rate:
            raise r.ProtocolError(r.ErrorCode.INVALID_REQUEST, f"A streamed turn may last {MAX_TURN_SECONDS} s; "
                                                               "this one was dropped")
        self._take(self._resample(np.frombuffer(data, "<i2").astype(np.float32) / 32768.0))

    def so_far(self) -> np.ndarray:
        """The turn's audio until now, at 24 kHz (a transcription may start before it ends)."""
        return np.concatenate(self._audio) if self._audio else np.zeros(0, np.float32)

    def end(self) -> np.ndarray:
        """No more audio is coming: the whole turn at 24 kHz (for a transcript)."""
        self._take(self._resample(np.zeros(0, np.float32), last=True))
        return np.concatenate(self._audio) if self._audio else np.zeros(0, np.float32)

    def _take(self, samples: np.ndarray) -> None:
        self._audio.append(samples)
        self._encoder.feed(torch.from_numpy(samples))

    def finish(self, text: str) -> ContextTurn:
        """After ``end``: the whole turn as a context turn: its codes, its text, its duration (no audio kept)."""
        codes = self._encoder.finish()
        if len(codes) == 0:
            raise r.ProtocolError(r.ErrorCode.INVALID_REQUEST, "The streamed turn holds no audio")
        return ContextTurn(self.speaker, text, None, {"csm": codes}, duration=self._encoder.samples / 24000)
