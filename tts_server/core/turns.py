"""A turn of the other side that arrives while they speak: 16-bit PCM frames in, CSM's codes out as it comes.

Each binary frame is resampled to 24 kHz (a stateful resampler: no seams) and
whole 80 ms frames are encoded at once (``MimiStreamEncoder``), so when the
speaker stops only the last fraction of a frame is left to encode: the wait for
``turn_saved`` does not grow with the turn.  The calls block (model compute):
the WebSocket runs them on the turn-encoding thread, one piece at a time.

Since the codec is fed as the audio comes, the only audio a turn keeps is the
copy for its transcript (a turn sent without text): 16-bit at Whisper's 16 kHz,
3.7 MiB for the longest turn rather than 11 MiB of float32 at 24 kHz.
"""

from __future__ import annotations

import numpy as np
import torch

from ..audio.codec import Resampler
from ..audio.pcm import OUTPUT_RATE, WholeSamples, to_float, to_int16
from ..engines.base import TURN_CODES, ContextTurn
from ..engines.stt import WHISPER_RATE
from . import replies as r

MAX_TURN_SECONDS = 120  # a streamed turn longer than this is refused (the user's side of a dialogue, not a podcast)
TRANSCRIPT_RATE = WHISPER_RATE  # the rate of ``so_far`` and ``end``: the recogniser's
# wall-clock seconds a streamed turn (or a hands-free utterance) may stay open: its audio limit and a margin for a
# client a little slower than real time; past it the client stopped sending or sends too slowly, and it is dropped
TURN_TIMEOUT = MAX_TURN_SECONDS + 30


class StreamedTurn:
    def __init__(self, speaker: int, sample_rate: int, encoder) -> None:
        self.speaker, self.sample_rate = speaker, sample_rate
        self._resample = Resampler(sample_rate, OUTPUT_RATE)
        self._to_transcript = Resampler(sample_rate, TRANSCRIPT_RATE)
        self._encoder = encoder
        self._whole = WholeSamples()  # a sample may be split across two frames
        self.received = 0  # samples at the client's rate
        # 16-bit PCM at 16 kHz, for speech recognition when the turn ends without text (one buffer: a flood of tiny
        # frames adds no per-piece overhead)
        self._audio = bytearray()

    def feed(self, pcm: bytes) -> None:
        data = self._whole(pcm)
        self.received += len(data) // 2
        if self.received > MAX_TURN_SECONDS * self.sample_rate:
            raise r.Refusal(r.ErrorCode.INVALID_REQUEST, f"A streamed turn may last {MAX_TURN_SECONDS} s; "
                                                         "this one was dropped")
        samples = np.frombuffer(data, "<i2")
        scaled = to_float(samples)
        self._keep(scaled, samples)
        self._encoder.feed(torch.from_numpy(self._resample(scaled)))

    @property
    def held_bytes(self) -> int:
        """The audio this turn holds for its transcript."""
        return len(self._audio)

    def so_far(self) -> np.ndarray:
        """The turn's audio until now, float at ``TRANSCRIPT_RATE`` (a transcription may start before it ends)."""
        return to_float(self._audio)

    def end(self) -> np.ndarray:
        """No more audio is coming: the whole turn, float at ``TRANSCRIPT_RATE`` (for a transcript)."""
        self._encoder.feed(torch.from_numpy(self._resample(np.zeros(0, np.float32), last=True)))
        self._keep(np.zeros(0, np.float32), None, last=True)
        return self.so_far()

    def _keep(self, scaled: np.ndarray, samples: np.ndarray | None, last: bool = False) -> None:
        """Keep the transcript's copy (the client's 16-bit samples as they came where its rate is Whisper's)."""
        if self.sample_rate == TRANSCRIPT_RATE:
            if samples is not None:
                self._audio += samples.tobytes()
            return
        resampled = self._to_transcript(scaled, last=last)
        self._audio += to_int16(resampled).tobytes()

    def finish(self, text: str) -> ContextTurn:
        """After ``end``: the whole turn as a context turn: its codes, its text, its duration (no audio kept)."""
        codes = self._encoder.finish()
        if len(codes) == 0:
            raise r.Refusal(r.ErrorCode.INVALID_REQUEST, "The streamed turn holds no audio")
        return ContextTurn(self.speaker, text, None, {TURN_CODES: codes}, duration=self._encoder.samples / OUTPUT_RATE)
