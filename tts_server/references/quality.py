"""Checks a voice prompt must pass before CSM imitates it.

A prompt is copied, flaws included: noise, clipping or silence in the prompt
come back in every sentence spoken with it.  So an uploaded clip must decode,
last 1-30 s, weigh at most 10 MB, not be silent, clip in under 1 % of its
samples, and have an estimated SNR of at least 15 dB.

SNR estimate: the clip is cut into 20 ms frames; the noise power is the 10th
percentile of the frames' mean power (speech has pauses, so the quietest frames
are the noise floor) and the signal power the 90th percentile.  Steady noise
has both percentiles close together (~0-3 dB); speech with a clean background
scores well above 20 dB.
"""

from __future__ import annotations

import io

import numpy as np

from . import RATE, ReferenceError, read_audio

MAX_BYTES = 10 * 1024 * 1024
SECONDS = (1.0, 30.0)
MIN_SNR_DB = 15.0
MAX_CLIPPED = 0.01
SILENCE_RMS = 1e-3


def estimate_snr_db(audio: np.ndarray, rate: int = RATE) -> float:
    frame = max(1, rate // 50)
    usable = len(audio) // frame * frame
    if usable == 0:
        return 0.0
    power = (audio[:usable].reshape(-1, frame).astype(np.float64) ** 2).mean(axis=1)
    noise = max(float(np.percentile(power, 10)), 1e-12)
    signal = float(np.percentile(power, 90))
    return 10.0 * np.log10(max(signal, 1e-12) / noise)


def check_voice_prompt(data: bytes, max_bytes: int = MAX_BYTES, max_seconds: float = SECONDS[1]) -> np.ndarray:
    """24 kHz mono samples of an uploaded WAV/FLAC/OGG, or ``ReferenceError`` saying what to fix."""
    if len(data) > max_bytes:
        raise ReferenceError(f"the voice file is {len(data) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB")
    audio = read_audio(io.BytesIO(data), "the voice file", (SECONDS[0], max_seconds))
    rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
    if rms < SILENCE_RMS:
        raise ReferenceError("the voice file is silent: record closer to the microphone")
    clipped = float(np.mean(np.abs(audio) >= 0.999))
    if clipped >= MAX_CLIPPED:
        raise ReferenceError(f"{clipped:.1%} of the samples are clipped (limit 1%): record at a lower level")
    snr = estimate_snr_db(audio)
    if snr < MIN_SNR_DB:
        raise ReferenceError(f"the estimated signal-to-noise ratio is {snr:.1f} dB (at least {MIN_SNR_DB:g} dB "
                             "needed): record in a quieter place")
    return audio
