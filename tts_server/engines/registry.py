"""The engines this server can run, by name: how each is built and what it can do.

Every layer that once listed engine names reads this instead: the settings
validate ``--engines`` against it, the app builds the chain with its factories,
the OpenAI model list, Wyoming's ``describe``, ``/v1/info`` and the routing of a
request that names an engine follow its entries.  A new engine is one module
(an ``Engine`` subclass) plus one ``register`` call; nothing above this layer
names an engine.

A factory takes the settings object duck-typed (engines sit below
``tts_server.settings`` and must not import it): it reads the attributes it
needs.  Factories import their engine's module when called, so that listing the
engines (``--help``, settings validation) loads no model library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from .base import Engine


class VoiceListing(str, Enum):
    """How an engine's voices are listed to clients (Wyoming's programs, its voice names)."""

    NAMED = "named"  # the server's named voices (references' voices.json) and any speaker id; keeps the routing
    OWN = "own"  # the engine's own voices, ``describe()["voices"]`` (each a name and language); picks the engine
    SINGLE = "single"  # one voice named as the engine, by speaker id; picks the engine


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do, as clients are told it (the engine object's attributes decide at run time)."""

    seedable: bool = False  # the same seed gives the same audio (so its replies may be cached)
    word_times: bool = False  # its sentence marks carry word times of its own (else the core's aligner, if any)
    native_speed: bool = True  # it speaks ``speed`` itself (else its audio is time-stretched)
    voices: VoiceListing = VoiceListing.SINGLE
    streaming: bool = True  # audio goes out while it is generated (else when a sentence is done)
    encodes_turns: bool = False  # the other side's turns are kept as its codes (``ContextTurn.cache[name]``)

    def describe(self) -> dict[str, Any]:
        return {"seedable": self.seedable, "word_times": self.word_times, "native_speed": self.native_speed,
                "voices": self.voices.value, "streaming": self.streaming, "encodes_turns": self.encodes_turns}


@dataclass(frozen=True)
class EngineSpec:
    """One registry entry."""

    name: str  # what ``--engines`` and a request's ``engine`` say; the built engine's ``name``
    factory: Callable[[Any], Engine]  # settings -> an unloaded engine
    label: str = ""  # for people: logs, ``/ready``'s reason ("CSM-1B unavailable: ..."); empty: the name
    description: str = ""  # Wyoming's program description; empty: the name
    attribution: tuple[str, str] | None = None  # (name, url) for Wyoming; None: the name and the engine's url
    aliases: tuple[str, ...] = ()  # OpenAI model names that pick this engine (besides its name)
    capabilities: Capabilities = field(default_factory=Capabilities)
    check: Callable[[Any], str | None] | None = None  # settings -> why this engine cannot be built (at validation)

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", self.label or self.name)
        object.__setattr__(self, "description", self.description or self.name)


_SPECS: dict[str, EngineSpec] = {}


def register(spec: EngineSpec) -> EngineSpec:
    """Add ``spec`` (after those registered before it: its place in listings); a taken name or alias is refused."""
    taken = {name for s in _SPECS.values() for name in (s.name, *s.aliases)}
    clash = taken & {spec.name, *spec.aliases}
    if clash:
        raise ValueError(f"engine name {', '.join(sorted(clash))} is already registered")
    _SPECS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _SPECS.pop(name, None)


def names() -> tuple[str, ...]:
    """Every registered engine's name, in registration order."""
    return tuple(_SPECS)


def specs() -> tuple[EngineSpec, ...]:
    return tuple(_SPECS.values())


def get(name: str) -> EngineSpec | None:
    return _SPECS.get(name)


def build(name: str, settings: Any) -> Engine:
    """The engine ``name`` made from ``settings``; an unknown name raises ``KeyError``.

    The engine is given the entry's name (its slot, metrics and replies say it), so one engine class may be
    registered twice under two names with two factories (say, a second Piper with other voices)."""
    engine = _SPECS[name].factory(settings)
    engine.name = name
    return engine


def label(name: str) -> str:
    spec = _SPECS.get(name)
    return spec.label if spec else name


def capabilities(name: str) -> Capabilities:
    """``name``'s capabilities; an engine built outside the registry gets the defaults."""
    spec = _SPECS.get(name)
    return spec.capabilities if spec else Capabilities()


def _items(text: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def _piper(settings: Any) -> Engine:
    from .piper import PiperEngine

    return PiperEngine(settings.piper_voice)


def _remote(settings: Any) -> Engine:
    from .remote import RemoteEngine

    return RemoteEngine(settings.remote_url or "", settings.remote_api_key, settings.remote_model,
                        settings.remote_voice_map(), _items(settings.remote_languages), settings.remote_timeout)


def _remote_needs_url(settings: Any) -> str | None:
    return None if settings.remote_url else "the 'remote' engine needs --remote-url (or TTS_REMOTE_URL)"


# CUDA: extra rows are nearly free.  CPU: MKL multiplies a matrix by up to 4 vectors in about the time of 1
# (docs/benchmarks.md), beyond that the cost grows with the rows.  MPS: batching is untested there.
AUTO_MAX_BATCH = {"cuda": 8, "cpu": 4}


def _csm(settings: Any) -> Engine:
    """CSM per ``--mode``: a bad ``--model-path`` raises ``ModelSourceError`` now, not when it loads."""
    from functools import partial
    from pathlib import Path

    import torch

    from .csm import CsmEngine, pick_device
    from .model_source import ModelSourceError, download, resolve_local

    if settings.mode == "reuse":
        if not settings.model_path:
            raise ModelSourceError("--mode reuse needs --model-path (or TTS_MODEL_PATH)")
        folder = resolve_local(settings.model_path)
        locate, shown = (lambda: folder), str(folder)
    else:
        cache = str(Path(settings.hf_home) / "hub") if settings.hf_home else None
        locate = partial(download, settings.model_id, settings.hf_token, cache)
        shown = settings.model_id
    if settings.threads:  # process-wide; several servers sharing a CPU otherwise fight over every core
        torch.set_num_threads(settings.threads)
    max_batch = settings.max_batch or AUTO_MAX_BATCH.get(pick_device(settings.device), 1)
    return CsmEngine(locate, settings.device, settings.dtype, label=shown, max_batch=max_batch,
                     first_chunk_frames=settings.first_chunk_frames, chunk_frames=settings.chunk_frames,
                     compile=settings.compile == "on", quantize=settings.quantize)


register(EngineSpec(
    "csm", _csm, label="CSM-1B", description="Sesame CSM-1B, conversational speech",
    attribution=("Sesame", "https://huggingface.co/sesame/csm-1b"),
    capabilities=Capabilities(seedable=True, native_speed=False, voices=VoiceListing.NAMED, encodes_turns=True)))
register(EngineSpec(
    "piper", _piper, label="Piper", description="Piper, fast local speech",
    attribution=("Piper (Open Home Foundation)", "https://github.com/OHF-Voice/piper1-gpl"),
    capabilities=Capabilities(word_times=True, voices=VoiceListing.OWN)))
register(EngineSpec(
    "remote", _remote, check=_remote_needs_url,  # Wyoming: attributed to the remote's own address
    capabilities=Capabilities(voices=VoiceListing.SINGLE)))
