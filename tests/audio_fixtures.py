"""Synthetic audio for reference and voice-prompt tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf


def speechlike(seconds: float, rate: int = 24000, seed: int = 0, level: float = 0.3) -> np.ndarray:
    """Voiced syllables (a 140 Hz harmonic tone, 3 per second) with pauses and a faint noise floor."""
    t = np.arange(int(seconds * rate)) / rate
    tone = sum(np.sin(2 * np.pi * 140 * k * t + k) / k for k in range(1, 6))
    envelope = np.clip(np.sin(2 * np.pi * 3 * t), 0, None)
    noise = np.random.default_rng(seed).normal(0, 1e-4, len(t))
    signal = tone * envelope
    return (level * signal / np.abs(signal).max() + noise).astype(np.float32)


def write_audio(path: Path, audio: np.ndarray, rate: int = 24000, channels: int = 1, fmt: str = "WAV") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.stack([audio] * channels, axis=1) if channels > 1 else audio
    sf.write(path, data, rate, format=fmt)
    return path


def audio_bytes(audio: np.ndarray, rate: int = 24000, fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format=fmt)
    return buffer.getvalue()
