"""Streamed time-stretching (CSM's speed): piece by piece, it sounds like one stretch of the whole file."""

from __future__ import annotations

import numpy as np
import pytest

from audio_fixtures import steady as spoken  # Piper without its random noise: the same audio every run
from tts_server.audio.stretch import Stretcher, stretch

RATE = 24000


def log_spectra(audio: np.ndarray, n: int = 512) -> np.ndarray:
    frames = np.lib.stride_tricks.sliding_window_view(audio[: len(audio) // n * n], n)[:: n // 2]
    return np.log(np.abs(np.fft.rfft(frames * np.hanning(n), axis=1)) + 1e-4)


@pytest.mark.parametrize("speed", [0.5, 1.5, 2.0])
def test_a_stream_stretched_in_csm_sized_pieces_matches_a_whole_file_stretch_without_clicks(speed):
    speech = spoken("The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.", RATE)
    whole = stretch(speech, RATE, speed)
    stretcher, pieces, seams = Stretcher(RATE, speed), [], []
    for offset in range(0, len(speech), 1920 * 6):  # CSM's chunks: 6 frames of 80 ms
        pieces.append(stretcher(speech[offset:offset + 1920 * 6]))
        seams.append(sum(map(len, pieces)))
    pieces.append(stretcher(np.zeros(0, np.float32), last=True))
    streamed = np.concatenate(pieces)
    assert abs(len(streamed) - len(whole)) <= 2 and abs(len(whole) - len(speech) / speed) <= 2
    # no clicks: around every seam the steps between samples stay within what the whole-file stretch has
    steps = np.abs(np.diff(streamed))
    limit = np.abs(np.diff(whole)).max()
    assert max(steps[max(0, s - 64):s + 64].max() for s in seams[:-1]) <= limit
    # and it sounds like the whole-file stretch: close spectra frame by frame (far closer than a shifted copy)
    n = min(len(whole), len(streamed))
    distance = np.mean(np.abs(log_spectra(streamed[:n]) - log_spectra(whole[:n])))
    shifted = np.mean(np.abs(log_spectra(np.roll(whole[:n], RATE // 5)) - log_spectra(whole[:n])))
    assert distance < shifted / 3, (distance, shifted)
