"""A streamed turn's buffers: the audio kept for its transcript is 16-bit at Whisper's 16 kHz (the codec is fed at
24 kHz as the audio comes, so nothing else is kept)."""

from __future__ import annotations

import numpy as np

from audio_fixtures import pcm16, speechlike
from tts_server.audio.codec import resample
from tts_server.core.turns import TRANSCRIPT_RATE, StreamedTurn


class Recorder:
    """Stands in for CSM's stream encoder: counts what it is fed."""

    def __init__(self) -> None:
        self.samples = 0

    def feed(self, samples) -> None:
        self.samples += len(samples)


def streamed(audio: np.ndarray, rate: int, piece: int = 4801) -> tuple[StreamedTurn, Recorder]:
    encoder = Recorder()
    turn = StreamedTurn(1, rate, encoder)
    data = pcm16(audio)
    for offset in range(0, len(data), piece):  # odd sizes: samples split across frames
        turn.feed(data[offset:offset + piece])
    return turn, encoder


def test_a_streamed_turn_keeps_its_audio_for_transcription_as_16_bit_at_16_khz():
    seconds, rate = 10, 48000
    audio = speechlike(seconds, rate=rate)
    turn, encoder = streamed(audio, rate)
    assert turn.held_bytes <= seconds * TRANSCRIPT_RATE * 2 + 4096  # 16-bit at 16 kHz: 2 bytes a sample
    heard = turn.end()
    expected = resample(np.frombuffer(pcm16(audio), "<i2") / 32768, rate, TRANSCRIPT_RATE)
    assert TRANSCRIPT_RATE == 16000 and heard.dtype == np.float32 and len(heard) == len(expected)
    assert np.abs(heard - expected).max() < 2e-4  # the same audio, within 16-bit rounding
    assert abs(encoder.samples - seconds * 24000) <= 1  # the codec still got all of it at 24 kHz


def test_audio_so_far_is_at_16_khz_and_at_that_rate_the_samples_are_kept_as_they_came():
    audio = speechlike(3, rate=16000)
    turn, _ = streamed(audio, 16000)
    sent = np.frombuffer(pcm16(audio), "<i2") / 32768
    assert np.array_equal(turn.so_far(), sent.astype(np.float32))
    assert np.array_equal(turn.end(), sent.astype(np.float32))
