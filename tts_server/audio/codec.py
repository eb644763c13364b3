"""Audio plumbing: resampling and container encoding (16-bit PCM itself is ``pcm``).

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

from .pcm import to_int16

_SUBTYPES = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS")}


def encode_file(samples: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """A complete file in ``fmt`` (wav, pcm, flac or ogg) of mono float samples."""
    return _int16_file(to_int16(samples), sample_rate, fmt)


def _int16_file(samples: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    if fmt == "pcm":
        return samples.tobytes()
    container, subtype = _SUBTYPES[fmt]
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, format=container, subtype=subtype)
    return buffer.getvalue()


def streaming_wav_header(sample_rate: int) -> bytes:
    """A 16-bit mono WAV header whose size fields say "unknown length" (0xFFFFFFFF)."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", unknown))


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


# Codec, container and muxer options per streamed format; every one is playable while it arrives (MP3 frames,
# Ogg pages flushed every 20 ms of audio, ADTS frames).  FLAC is not among them: its header holds the total length,
# which a stream cannot know (libsndfile then refuses the file), so it is encoded whole at the end.
_STREAMED = {"mp3": ("mp3", "libmp3lame", {}), "opus": ("ogg", "libopus", {"page_duration": "20000"}),
             "aac": ("adts", "aac", {})}
STREAM_RATES = {"opus": (8000, 12000, 16000, 24000, 48000),
                "mp3": (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000),
                "aac": (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)}


def codec_rate(fmt: str, rate: int) -> int:
    """``rate`` if the format's codec takes it, else the nearest rate above it that it takes (else its highest):
    any ``--sample-rate`` works with every format."""
    rates = STREAM_RATES.get(fmt)
    if not rates or rate in rates:
        return rate
    return next((r for r in rates if r >= rate), rates[-1])


class StreamEncoder:
    """16-bit mono PCM in, a growing ``fmt`` file out, chunk by chunk (pcm, wav, mp3, opus, aac, flac).

    PCM and WAV (with the unknown-length header) are written directly; mp3,
    opus and aac go through FFmpeg's encoders and muxers via PyAV; FLAC is
    held and encoded whole by ``finish``.  The bytes each call returns may be
    empty (an encoder waiting for a full frame); joined, they are one valid file.
    """

    def __init__(self, fmt: str, sample_rate: int) -> None:
        self.fmt, self.sample_rate = fmt, sample_rate
        self._header = streaming_wav_header(sample_rate) if fmt == "wav" else b""
        self._held = bytearray()  # FLAC's samples until the end
        self._container = None
        if fmt in _STREAMED:
            import av

            container, codec, options = _STREAMED[fmt]
            self._out = bytearray()
            self._container = av.open(self, mode="w", format=container, options=options)
            self._stream = self._container.add_stream(codec, rate=sample_rate, layout="mono")
            self._pts = 0

    def write(self, data: bytes) -> int:  # PyAV writes the container's bytes here (a write-only, unseekable file)
        self._out += data
        return len(data)

    def encode(self, pcm: bytes) -> bytes:
        if self.fmt == "flac":
            self._held += pcm
            return b""
        if self._container is None:
            out, self._header = self._header + pcm, b""
            return out
        self._mux(self._frame(pcm) if pcm else None, final=False)
        return self._take()

    def finish(self) -> bytes:
        if self.fmt == "flac":
            return _int16_file(np.frombuffer(bytes(self._held), dtype="<i2"), self.sample_rate, "flac")
        if self._container is None:
            out, self._header = self._header, b""
            return out
        self._mux(None, final=True)
        self._container.close()
        return self._take()

    def _frame(self, pcm: bytes):
        import av

        samples = np.frombuffer(pcm, dtype="<i2")
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
        frame.sample_rate, frame.pts = self.sample_rate, self._pts
        self._pts += len(samples)
        return frame

    def _mux(self, frame, final: bool) -> None:
        if frame is None and not final:
            return
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def _take(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out
