"""Reference audio: emotion clips, default voices per speaker, and voice prompts.

CSM-1B has no emotion or voice knob: it imitates the voice and mood of the
audio in its context.  This package loads and validates the clips the server
puts there:

- ``emotion_map.json``: ``{"happy": [{"path": "happy/a.wav", "text": "...", "speaker": 0, "source": "..."}]}``;
- ``voices.json``: ``{"3": {"path": "voices/speaker-3.wav", "text": "...", "name": "narrator"}}``, a default
  voice per speaker id (``name`` optional: what HTTP clients may call it).

Every path is relative to the references folder and must stay inside it (no
``..``, no absolute paths, no symlink leading out).  Clips are decoded with
soundfile and converted to 24 kHz mono float32.  Maps are rewritten atomically
(temporary file + rename), so a crash mid-write leaves the old map intact.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from ..audio.codec import resample
from ..audio.pcm import OUTPUT_RATE

log = logging.getLogger(__name__)
RATE = OUTPUT_RATE  # clips are kept at CSM's rate
DEFAULT_REFERENCES = Path(__file__).resolve().parent.parent.parent / "references"  # the checkout's folder
CLIP_SECONDS = (0.5, 30.0)
RATES = (8000, 96000)  # sample rates accepted for clips and uploads
MAX_CHANNELS = 2
EMOTION_MAP = "emotion_map.json"
VOICE_MAP = "voices.json"


class ReferenceError(ValueError):
    """A clip or map entry that cannot be used; the message names it and says why."""


@dataclass
class Clip:
    """A validated reference: where it lives, what it says, and its 24 kHz mono samples."""

    path: str
    text: str
    audio: np.ndarray = field(repr=False)
    speaker: int | None = None
    source: str | None = None
    name: str | None = None  # voices.json: a name clients may ask for (the HTTP API's ``voice``)

    @property
    def duration_s(self) -> float:
        return len(self.audio) / RATE


def confined(root: Path, relative: str) -> Path:
    """``root / relative`` if it stays inside ``root`` after resolving symlinks, else ``ReferenceError``."""
    if not isinstance(relative, str) or not relative:
        raise ReferenceError("path must be a non-empty string")
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise ReferenceError(f"path {relative!r} must be relative to the references folder, without '..'")
    base = root.resolve()
    resolved = (base / candidate).resolve()
    if base != resolved and base not in resolved.parents:
        raise ReferenceError(f"path {relative!r} leads outside the references folder")
    return resolved


def to_24k_mono(samples: np.ndarray, rate: int) -> np.ndarray:
    """Any channel count and rate in; 24 kHz mono float32 out."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    return resample(samples, rate, RATE)


def read_audio(source: Any, name: str, seconds: tuple[float, float] = CLIP_SECONDS) -> np.ndarray:
    """Decode a file path or file object and check its length; ``name`` appears in errors.

    Rate, channels and the declared length are checked from the header first, and
    at most ``seconds[1]`` of audio is ever decoded: a small file that unpacks to
    hours of samples (FLAC compresses silence ~1000:1) costs no memory.
    """
    try:
        with sf.SoundFile(source) as audio_file:
            rate, channels = audio_file.samplerate, audio_file.channels
            if not RATES[0] <= rate <= RATES[1]:
                raise ReferenceError(f"{name} has a sample rate of {rate} Hz; {RATES[0]} to {RATES[1]} Hz are accepted")
            if channels > MAX_CHANNELS:
                raise ReferenceError(f"{name} has {channels} channels; send mono or stereo audio")
            most = int(seconds[1] * rate)
            if audio_file.frames > most:  # the header's length (a file that hides its length is read up to the cap)
                raise ReferenceError(f"{name} lasts {audio_file.frames / rate:.2f} s; it must last "
                                     f"{seconds[0]:g} to {seconds[1]:g} s")
            samples = audio_file.read(most + 1, dtype="float32", always_2d=True)
    except ReferenceError:
        raise
    except Exception as exc:  # soundfile raises several types for undecodable input
        raise ReferenceError(f"{name} cannot be decoded as WAV, FLAC or OGG ({exc.__class__.__name__})") from None
    if len(samples) > most:
        raise ReferenceError(f"{name} lasts more than {seconds[1]:g} s; it must last {seconds[0]:g} to "
                             f"{seconds[1]:g} s")
    audio = to_24k_mono(samples, rate)
    duration = len(audio) / RATE
    if not seconds[0] <= duration <= seconds[1]:
        raise ReferenceError(f"{name} lasts {duration:.2f} s; it must last {seconds[0]:g} to {seconds[1]:g} s")
    return audio


def load_clip(root: Path, entry: Any, where: str) -> Clip:
    if not isinstance(entry, dict):
        raise ReferenceError(f"{where} must be an object with 'path' and 'text'")
    text = entry.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ReferenceError(f"{where} needs a 'text' transcript")
    speaker = entry.get("speaker")
    if speaker is not None and (isinstance(speaker, bool) or not isinstance(speaker, int) or speaker < 0):
        raise ReferenceError(f"{where} has an invalid 'speaker' (a non-negative integer or absent)")
    path = confined(root, entry.get("path"))
    if not path.is_file():
        raise ReferenceError(f"{where}: file {entry.get('path')!r} does not exist")
    audio = read_audio(path, f"{where} ({entry['path']})")
    source, name = entry.get("source"), entry.get("name")
    return Clip(entry["path"], text.strip(), audio, speaker, source if isinstance(source, str) else None,
                name.strip() if isinstance(name, str) and name.strip() else None)


def voice_names(root: str | Path) -> dict[str, int]:
    """``voices.json``'s voice names -> speaker ids, read without loading any audio (for settings checks)."""
    try:
        data = _read_map(Path(root) / VOICE_MAP)
    except (ValueError, OSError):
        return {}
    return {entry["name"].strip(): int(key) for key, entry in data.items()
            if str(key).isascii() and str(key).isdigit() and isinstance(entry, dict)
            and isinstance(entry.get("name"), str) and entry["name"].strip()}


def _read_map(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ReferenceError(f"{path.name} must hold a JSON object")
    return data


def load_emotions(root: str | Path) -> tuple[dict[str, list[Clip]], list[str]]:
    """Emotions with at least one good clip, and one warning per skipped entry (or for a malformed map)."""
    root = Path(root)
    try:
        data = _read_map(root / EMOTION_MAP)
    except (ValueError, OSError) as exc:
        return {}, [f"{root / EMOTION_MAP} is malformed, no emotions loaded: {exc}"]
    emotions: dict[str, list[Clip]] = {}
    warnings: list[str] = []
    for name, entries in data.items():
        if not isinstance(entries, list):
            warnings.append(f"emotion {name!r}: expected a list of clips; skipped")
            continue
        for i, entry in enumerate(entries):
            try:
                emotions.setdefault(name, []).append(load_clip(root, entry, f"emotion {name!r} clip {i}"))
            except ReferenceError as exc:
                warnings.append(f"{exc}; skipped")
        if not emotions.get(name):
            emotions.pop(name, None)
    return emotions, warnings


def load_voices(root: str | Path) -> tuple[dict[int, Clip], list[str]]:
    """Default voice per speaker id from ``voices.json``, and warnings for skipped entries."""
    root = Path(root)
    try:
        data = _read_map(root / VOICE_MAP)
    except (ValueError, OSError) as exc:
        return {}, [f"{root / VOICE_MAP} is malformed, no default voices loaded: {exc}"]
    voices: dict[int, Clip] = {}
    warnings: list[str] = []
    for key, entry in data.items():
        if not (str(key).isascii() and str(key).isdigit()):
            warnings.append(f"voices.json key {key!r} is not a speaker id; skipped")
            continue
        try:
            voices[int(key)] = load_clip(root, entry, f"voice of speaker {key}")
        except ReferenceError as exc:
            warnings.append(f"{exc}; skipped")
    return voices, warnings


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` in one rename, so readers see the old or the new map, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, ensure_ascii=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_wav_atomic(path: Path, audio: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".wav")
    os.close(fd)
    try:
        sf.write(tmp, np.clip(audio, -1, 1), RATE, subtype="PCM_16")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_voice(root: str | Path, speaker: int, audio: np.ndarray, text: str, source: str = "pinned") -> str:
    """Store ``audio`` as speaker ``speaker``'s default voice; returns its path relative to ``root``."""
    root = Path(root)
    relative = f"voices/speaker-{speaker}.wav"
    write_wav_atomic(root / relative, audio)
    data = _read_map(root / VOICE_MAP)
    data[str(speaker)] = {"path": relative, "text": text, "source": source}
    write_json_atomic(root / VOICE_MAP, data)
    return relative


def add_emotion_clip(root: str | Path, emotion: str, relative: str, text: str, speaker: int | None = None,
                     source: str | None = None) -> None:
    """Append one entry to ``emotion_map.json`` (the file must already be in place)."""
    root = Path(root)
    data = _read_map(root / EMOTION_MAP)
    entry: dict[str, Any] = {"path": relative, "text": text}
    if speaker is not None:
        entry["speaker"] = speaker
    if source:
        entry["source"] = source
    clips = data.setdefault(emotion, [])
    clips[:] = [c for c in clips if not (isinstance(c, dict) and c.get("path") == relative)] + [entry]
    write_json_atomic(root / EMOTION_MAP, data)
