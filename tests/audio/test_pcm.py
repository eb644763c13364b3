"""16-bit PCM declared once: a sample split across frames is carried whole, and the conversions keep every
sample a client sent or was sent."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

from tts_server.audio.codec import StreamEncoder
from tts_server.audio.pcm import FRAME_SAMPLES, OUTPUT_RATE, WholeSamples, pcm_bytes, to_float, to_int16


def test_pcm_cut_anywhere_is_read_as_the_same_samples():
    data = np.arange(-500, 500, dtype="<i2").tobytes()
    for cuts in ((1, 2, 3, 7, 1000), (999,), (1,) * 13):
        whole, read, at = WholeSamples(), b"", 0
        for size in (*cuts, len(data)):
            piece, at = data[at:at + size], at + size
            out = whole(piece)
            assert len(out) % 2 == 0
            read += out
        assert read == data


def test_int16_reads_into_minus_one_to_one_and_full_scale_floats_clip_without_wrapping():
    extremes = np.array([-32768, -1, 0, 1, 32767], "<i2")
    assert to_float(extremes.tobytes()).tolist() == [-1.0, -1 / 32768, 0.0, 1 / 32768, 32767 / 32768]
    assert to_float(extremes).dtype == np.float32
    assert to_int16(np.array([-2.0, -1.0, 1.0, 3.0])).tolist() == [-32767, -32767, 32767, 32767]
    assert pcm_bytes(np.array([0.5], np.float32)) == np.array([16384], "<i2").tobytes()


def test_the_frame_is_80_ms_of_24_khz():
    assert (OUTPUT_RATE, FRAME_SAMPLES) == (24000, 1920)


def test_a_flac_stream_holds_exactly_the_samples_it_was_given():
    samples = (np.sin(np.arange(4800) / 7) * 32767).astype("<i2")
    encoder = StreamEncoder("flac", 24000)
    encoder.encode(samples[:1001].tobytes())
    data = encoder.encode(samples[1001:].tobytes()) + encoder.finish()
    decoded, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == 24000 and np.array_equal(decoded, samples)
