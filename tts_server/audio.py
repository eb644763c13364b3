"""Audio plumbing: resampling, 16-bit conversion and container encoding.

Every engine produces float32 mono at its own native rate; clients always get
one output rate (``--sample-rate``).  Resampling is stateful (``soxr``'s
stream resampler) so that audio resampled chunk by chunk has no seams.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf
import soxr

_SUBTYPES = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS")}


def to_int16(samples: np.ndarray) -> np.ndarray:
    """Float samples to int16, clipping (random or hot models exceed [-1, 1]; wrapping would crackle)."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")


def pcm_bytes(samples: np.ndarray) -> bytes:
    return to_int16(samples).tobytes()


def encode_file(samples: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """A complete file in ``fmt`` (wav, pcm, flac or ogg) of mono float samples."""
    if fmt == "pcm":
        return pcm_bytes(samples)
    container, subtype = _SUBTYPES[fmt]
    buffer = io.BytesIO()
    sf.write(buffer, to_int16(samples), sample_rate, format=container, subtype=subtype)
    return buffer.getvalue()


def streaming_wav_header(sample_rate: int) -> bytes:
    """A 16-bit mono WAV header whose size fields say "unknown length" (0xFFFFFFFF)."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", unknown))


def decode_file(data: bytes) -> tuple[np.ndarray, int]:
    """Decode WAV/FLAC/OGG bytes in memory to float32 mono and its rate."""
    samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return samples.mean(axis=1), rate


class Resampler:
    """Chunk-by-chunk resampler whose output equals resampling the whole signal."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.in_rate, self.out_rate = in_rate, out_rate
        self._stream = None if in_rate == out_rate else soxr.ResampleStream(
            in_rate, out_rate, 1, dtype="float32", quality="HQ")

    def __call__(self, chunk: np.ndarray, last: bool = False) -> np.ndarray:
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        if self._stream is None:
            return chunk
        return self._stream.resample_chunk(chunk, last=last)


def resample(samples: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """Whole-signal resampling to 24 kHz mono (references, uploaded voices)."""
    if in_rate == out_rate:
        return samples.astype(np.float32)
    return soxr.resample(samples.astype(np.float32), in_rate, out_rate, quality="HQ")
