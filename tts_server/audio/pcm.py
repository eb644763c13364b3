"""16-bit PCM, the one audio format on every wire: its rate, its frame and its conversions, declared once.

Clients send and receive little-endian int16 mono; engines and the codec work
in float32.  Reading int16 divides by 32768 so the whole int16 range lands in
[-1, 1); writing multiplies by 32767 after clipping, so that a full-scale float
never wraps (a crackle) and the bytes every stream has sent so far stay the same.
"""

from __future__ import annotations

import numpy as np

OUTPUT_RATE = 24000  # CSM's and Mimi's native rate, and the default --sample-rate
FRAME_MS = 80  # one CSM / Mimi frame: the unit of generation, streaming and context trimming
FRAME_SECONDS = FRAME_MS / 1000
FRAME_SAMPLES = OUTPUT_RATE * FRAME_MS // 1000  # 1920: Mimi's hop
SAMPLE_BYTES = 2
INT16_SCALE = 32768.0  # int16 -> float
INT16_PEAK = 32767.0  # float -> int16: +1.0 is the loudest sample int16 holds


def to_float(pcm: bytes | np.ndarray) -> np.ndarray:
    """16-bit PCM (bytes or int16 samples) to float32 in [-1, 1)."""
    samples = np.frombuffer(pcm, "<i2") if isinstance(pcm, (bytes, bytearray, memoryview)) else pcm
    return samples.astype(np.float32) / np.float32(INT16_SCALE)


def to_int16(samples: np.ndarray) -> np.ndarray:
    """Float samples to int16, clipping (random or hot models exceed [-1, 1]; wrapping would crackle)."""
    return (np.clip(samples, -1.0, 1.0) * INT16_PEAK).round().astype("<i2")


def pcm_bytes(samples: np.ndarray) -> bytes:
    return to_int16(samples).tobytes()


class WholeSamples:
    """Cuts a stream of PCM bytes at sample boundaries: a piece that ends mid-sample keeps its last byte for the
    next (clients and remotes split their frames and reads anywhere; a shifted byte would turn speech into noise)."""

    def __init__(self) -> None:
        self._odd = b""

    def __call__(self, pcm: bytes) -> bytes:
        data, self._odd = self._odd + pcm, b""
        if len(data) % SAMPLE_BYTES:
            data, self._odd = data[:-1], data[-1:]
        return data
