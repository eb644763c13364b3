"""Settings with pydantic-settings: command-line flag > environment variable > ``.env`` file > default.

Every option ``--some-option`` has the variable ``TTS_SOME_OPTION``; the hub's
own ``HF_TOKEN`` and ``HF_HOME`` are read as they are, and the remote engine's
key only from ``TTS_REMOTE_API_KEY``.  The flags are made from the fields
(their ``description`` is the ``--help`` text); ``.env.template`` lists them
all.  A bad value stops the start with exit code 2 and a message naming the
option.  Secrets are kept out of ``repr`` so they never reach a log.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence, get_args
from urllib.parse import urlparse

from pydantic import AfterValidator, AliasChoices, BeforeValidator, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict

from .audio.pcm import OUTPUT_RATE
from .engines import registry
from .engines.request import LANGUAGE_CODE
from .core.session_calls import store_kind
from .references import DEFAULT_REFERENCES


def _items(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _engines(text: str) -> str:
    names = _items(text)
    if not names or any(name not in registry.names() for name in names):
        raise ValueError(f"{text!r}: list engines from {', '.join(registry.names())}, e.g. csm,piper")
    if len(set(names)) != len(names):
        raise ValueError(f"{text!r} names an engine twice")
    return ",".join(names)


def _engine_name(text: str) -> str:
    if text not in registry.names():
        raise ValueError(f"{text!r} is not an engine; use one of: {', '.join(registry.names())}")
    return text


def _remote_voices(text: str) -> str:
    for entry in _items(text):
        ours, sep, theirs = (s.strip() for s in entry.partition("="))
        if not (sep and ours and theirs):
            raise ValueError(f"{entry!r} is not SPEAKER=REMOTE_VOICE")
    return text  # the names are checked once the references folder is known (Settings._chain_rules)


def _languages(text: str) -> str:
    for part in _items(text):
        if not LANGUAGE_CODE.fullmatch(part):
            raise ValueError(f"{part!r} is not a language code such as en, de or en_US")
    return text


def _networks(text: str) -> str:
    for part in _items(text):
        try:
            ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise ValueError(f"{part!r} is not an IP address or network") from None
    return text


def _costs(values: tuple[str, ...]) -> tuple[str, ...]:
    for text in values:
        name, sep, price = text.partition("=")
        try:
            ok = bool(sep) and name.strip() in registry.names() and float(price) >= 0
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{text!r} is not ENGINE=USD_PER_MILLION_CHARS (e.g. remote=15)")
    return values


def _wyoming_uri(text: str) -> str:
    parsed = urlparse(text)
    if (parsed.scheme == "tcp" and parsed.hostname and parsed.port is not None) or \
            (parsed.scheme == "unix" and parsed.path):
        return text
    raise ValueError(f"{text!r} is not tcp://HOST:PORT or unix:///PATH")


def _session_store(text: str) -> str:
    store_kind(text)  # raises, naming what it takes
    return text


def _whisper_language(text: str) -> str:
    from .engines.stt import whisper_language

    if not whisper_language(text):
        raise ValueError(f"{text!r} is not a language Whisper knows (en, de, fr, ...)")
    return text


def _non_negative(value: float) -> float:
    if not 0 <= value < float("inf"):
        raise ValueError(f"must be a number, 0 or more, got {value}")
    return value


def _many(value: Any) -> Any:
    """A repeatable option: the flag repeats, the variable separates values with commas."""
    return tuple(_items(value)) if isinstance(value, str) else tuple(value or ())


Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
Port = Annotated[int, Field(ge=0, le=65535)]
NonNegativeFloat = Annotated[float, AfterValidator(_non_negative)]
EngineList = Annotated[str, AfterValidator(_engines)]  # names checked against the registry when validated
EngineName = Annotated[str, AfterValidator(_engine_name)]
WhisperLanguage = Annotated[str, AfterValidator(_whisper_language)]
RemoteVoices = Annotated[str, AfterValidator(_remote_voices)]
Languages = Annotated[str, AfterValidator(_languages)]
Networks = Annotated[str, AfterValidator(_networks)]
WyomingUri = Annotated[str, AfterValidator(_wyoming_uri)]
SessionStoreUrl = Annotated[str, AfterValidator(_session_store)]
Many = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_many)]
Costs = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_many), AfterValidator(_costs)]
ENV_ONLY = ("hf_token", "hf_home", "remote_api_key", "chat_api_key")  # secrets and the hub's own variables: never flags


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TTS_", extra="ignore", frozen=True, env_ignore_empty=True,
                                      populate_by_name=True)

    host: str = Field("0.0.0.0", description="address to listen on")
    port: Port = Field(8765, description="port for WebSocket and HTTP (0 picks a free one)")
    mode: Literal["download", "reuse"] = Field("download", description="download: fetch --model-id from the hub; "
        "reuse: load --model-path")
    model_path: str | None = Field(None, description="model folder (with config.json) or hub cache folder "
        "models--org--name")
    model_id: str = Field("sesame/csm-1b", description="hub repository to download in download mode")
    device: Literal["auto", "cuda", "mps", "cpu"] = Field("auto", description="auto = cuda, then mps, then cpu")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto = bfloat16 on CUDA when "
        "supported, and on a CPU that computes bfloat16 natively (AVX512-BF16 or AMX) or with --quantize int8; else "
        "float32")
    references: str = Field(str(DEFAULT_REFERENCES), description="folder with emotion_map.json and reference clips")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="logging level")
    max_text_chars: Positive = Field(4000, description="longest accepted text, in characters")
    max_queue: Positive = Field(32, description="most requests waiting at once; beyond it requests get 'busy'")
    engines: EngineList | None = Field(None, description="the engine chain, in routing order, e.g. csm,remote,piper: a "
        "request goes to the first engine that has not failed (waiting while it loads) and is retried on the next "
        "when one fails before any audio; unset: as --engine and --fallback say (csm,piper)")
    # --engine and --fallback are shorthands for the built-in engines, kept as they were; --engines, --overflow-engine
    # and --engine-cost take any engine of the registry (engines/registry.py).
    engine: Literal["auto", "csm", "piper"] = Field("auto", description="shorthand for --engines: auto = csm,FALLBACK; "
        "csm or piper: that engine only")
    fallback: Literal["piper", "none"] = Field("piper", description="the engine after CSM in auto mode (shorthand for "
        "--engines csm,piper)")
    overflow_engine: EngineName | None = Field(None, description="when the queue is full, "
        "requests that named no engine go to this engine of the chain instead of getting 'busy'; off when unset")
    remote_url: str | None = Field(None, description="base URL of an OpenAI-compatible speech API for the 'remote' "
        "engine, e.g. https://api.openai.com/v1 or http://gpu-box:8765/v1 (key: env TTS_REMOTE_API_KEY)")
    remote_model: str = Field("tts-1", description="model name sent to the remote engine")
    remote_voices: RemoteVoices | None = Field(None, description="speaker ids (or OpenAI or voices.json voice names) "
        "to the remote's voices, e.g. 0=af_bella,1=am_adam; unmapped ids take OpenAI's voice of that number (0 alloy, "
        "1 ash, ...)")
    remote_languages: Languages | None = Field(None, description="comma-separated languages the remote engine speaks "
        "(e.g. en,de,fr); unset: it gets requests in any language")
    remote_timeout: Positive = Field(30, description="seconds to wait for the remote engine to connect or send more "
        "audio")
    cache_mb: NonNegativeFloat = Field(256.0, description="response cache size in MiB for requests with a seed and "
        "context off (CSM only); 0 = off")
    engine_cost: Costs = Field((), description="ENGINE=USD_PER_MILLION_CHARS for the estimated spend in /v1/info and "
        "/metrics; repeat for several engines")
    sample_rate: Positive = Field(OUTPUT_RATE, description="output sample rate in Hz; every engine is resampled to it")
    first_chunk_frames: Positive = Field(2, description="CSM frames (80 ms each) in a request's first audio chunk")
    chunk_frames: Positive = Field(6, description="CSM frames in each later audio chunk")
    max_batch: NonNegative = Field(0, description="CSM requests generated together in one batch; 0 = auto: 8 on CUDA, "
        "4 on CPU (where more rows than 4 cost a lone request more than they save), 1 on MPS")
    threads: NonNegative = Field(0, description="CPU threads for CSM's compute; 0 = torch's default (all cores). "
        "Running several servers on one machine's CPU, give each cores / servers")
    quantize: Literal["none", "int8"] = Field("none", description="int8: CSM's backbone, depth decoder and heads with "
        "int8 weights (per-output-channel scales, weight-only), ~4x fewer bytes read than float32; none: as --dtype "
        "says")
    compile: Literal["on", "off"] = Field("off", description="on: torch.compile CSM's depth-decoder step (for CUDA; "
        "~30 s warm-up, no gain on CPU)")
    stream_buffer_seconds: Positive = Field(30, description="most seconds of audio a connection may leave unread "
        "before its stream is stopped with 'client_too_slow'")
    pin_voices: Literal["on", "off"] = Field("off", description="on: a speaker's first CSM generation of 2 s or more "
        "becomes its default voice for every client (for a server whose clients you trust: one client's request picks "
        "everyone's voice)")
    max_context_turns: Positive = Field(8, description="turns of conversation history kept per connection")
    api_key: str | None = Field(None, description="comma-separated API keys; when set, WebSocket and HTTP (except "
        "/health) need one", repr=False)
    allowed_origins: str | None = Field(None, description="comma-separated browser origins allowed besides the "
        "server's own; * = any")
    trusted_proxies: Networks | None = Field(None, description="comma-separated addresses or networks of reverse "
        "proxies (e.g. 127.0.0.1 for nginx on this host) whose X-Forwarded-For names the client for the per-address "
        "limits")
    max_connections: Positive = Field(256, description="most open connections, every interface "
        "counted (WebSocket, HTTP, Wyoming)")
    max_connections_per_address: Positive = Field(16, description="most open connections from one client address")
    rate_limit: Positive = Field(120, description="most synthesis, voice and turn requests and new sessions a minute per "
        "connection")
    max_queued_per_connection: Positive = Field(8, description="most requests one connection may have waiting or "
        "running")
    max_frame_bytes: Positive = Field(16 * 2**20, description="largest WebSocket frame; larger ones close that "
        "connection (1009)")
    max_voice_bytes: Positive = Field(10 * 2**20, description="largest voice-prompt upload in bytes")
    max_voice_seconds: Positive = Field(30, description="longest voice-prompt upload in seconds")
    generation_timeout: Positive = Field(120, description="seconds an engine may go without producing audio before the "
        "request is abandoned ('generation_timeout') and a fresh worker takes over")
    text_timeout: Positive = Field(10, description="seconds a streamed text (the WebSocket's 'text_stream', a "
        "Wyoming stream) may go without completing a sentence or ending before it fails ('text_timeout')")
    shutdown_grace: Positive = Field(30, description="on SIGTERM/Ctrl-C, seconds running requests may take to finish")
    wyoming_uri: WyomingUri | None = Field(None, description="also serve the Wyoming protocol (Home Assistant, "
        "Rhasspy) here, e.g. tcp://0.0.0.0:10200; off when unset")
    wyoming_zeroconf: str | None = Field(None, description="announce the Wyoming server over zeroconf (mDNS) under "
        "this name so Home Assistant discovers it; the bare flag uses 'csm-tts'",
        json_schema_extra={"const": "csm-tts"})
    piper_voice: Many = Field((), description="a Piper voice .onnx (with its .onnx.json beside it) or a folder of "
        "them; repeat for several languages (a request's 'language' picks one; the first is the default); default "
        "en_US-joe-medium")
    stt_model: str | None = Field(None, description="speech recognition for turns sent without text: a "
        "faster-whisper model (a size such as base or small, or a hub repository, fetched in download mode) or a "
        "folder holding one; off when unset")
    stt_language: WhisperLanguage | None = Field(None, description="the language every speaker "
        "speaks (a Whisper language code such as en, de, fr): each turn is then transcribed without detecting it, "
        "in a window its own length (much faster); unset: learnt from each conversation's first turn (or its "
        "turn_start's 'language')")
    turn_detector: Literal["smart-turn", "vad"] = Field("smart-turn", description="what ends a hands-free turn "
        "(turn_start with vad): smart-turn (a short silence proposes the end and Smart Turn v3.2, from the pipecat-ai "
        "wheel, hears whether the utterance is complete; an incomplete one waits for more, up to "
        "--turn-max-silence-ms) or vad (a fixed silence of --vad-silence-ms)")
    vad_silence_ms: Positive | None = Field(None, description="milliseconds of silence after which the VAD proposes "
        "the end of an utterance (smart-turn; default 200) or ends it (vad; default 600)")
    turn_max_silence_ms: Positive = Field(3000, description="smart-turn: milliseconds of silence that end an "
        "utterance the model heard as incomplete")
    chat_url: str | None = Field(None, description="an OpenAI-compatible chat-completions API that writes the "
        "assistant's answers for 'respond' and the voice chat page, e.g. http://localhost:11434/v1 (Ollama) or "
        "https://api.openai.com/v1 (key: env TTS_CHAT_API_KEY); off when unset")
    chat_model: str = Field("llama3.2", description="the chat model to ask at --chat-url")
    chat_system_prompt: str = Field("You are a friendly voice assistant. Answer in one to three short spoken "
        "sentences, without lists or markup.", description="the system prompt sent before the conversation")
    session_store: SessionStoreUrl = Field("sqlite:///sessions.db", description="where conversation sessions are "
        "kept: sqlite:///PATH (a file; relative to the working directory; survives restarts), redis://HOST:PORT/DB "
        "(shared by several replicas) or memory (this process only)")
    session_ttl: Positive = Field(86400, description="seconds of inactivity after which a session and its turns "
                                                    "are deleted")
    max_sessions: Positive = Field(10000, description="most sessions kept at once")
    max_sessions_per_owner: Positive = Field(1000, description="most sessions one API key (on a server without "
        "keys: one client address) may hold at once ('too_many_sessions'), so one client cannot take them all")
    max_session_bytes: Positive = Field(4 * 2**20, description="most bytes of turns one session keeps (codes and "
                                                               "text); the oldest turns go beyond it")
    request_timeout: Positive = Field(30, description="seconds a client has to send a whole HTTP request, head and "
                                                      "body; slower ones get 408 and are disconnected")
    write_timeout: Positive = Field(30, description="seconds an HTTP or WebSocket client may go without reading "
                                                    "what it was sent before it is disconnected")
    hf_token: str | None = Field(None, validation_alias=AliasChoices("hf_token", "HF_TOKEN"), repr=False)
    hf_home: str | None = Field(None, validation_alias=AliasChoices("hf_home", "HF_HOME"))
    remote_api_key: str | None = Field(None, repr=False)
    chat_api_key: str | None = Field(None, repr=False)

    @model_validator(mode="after")
    def _chain_rules(self) -> "Settings":
        chain = self.chain()
        if self.wyoming_zeroconf and not str(self.wyoming_uri or "").startswith("tcp://"):
            raise ValueError("--wyoming-zeroconf needs a tcp:// --wyoming-uri")
        for name in chain:
            spec = registry.get(name)
            problem = spec.check(self) if spec and spec.check else None
            if problem:
                raise ValueError(problem)
        if self.overflow_engine and self.overflow_engine not in chain[1:]:
            raise ValueError(f"--overflow-engine {self.overflow_engine} must be an engine of the chain after the "
                             f"first ({','.join(chain)})")
        try:
            self.remote_voice_map()
        except ValueError as exc:
            raise ValueError(f"--remote-voices: {exc}") from None
        return self

    def chain(self) -> list[str]:
        """The engine names in routing order: ``--engines``, else what ``--engine``/``--fallback`` mean."""
        if self.engines:
            return self.engines.split(",")
        if self.engine == "auto":
            return ["csm"] + (["piper"] if self.fallback == "piper" else [])
        return [self.engine]

    def remote_voice_map(self) -> dict[int, str]:
        """``--remote-voices`` as {speaker id: remote voice}, names resolved with the references' voices.json."""
        from .engines.remote import parse_voices
        from .references import voice_names

        return parse_voices(self.remote_voices, voice_names(self.references))

    def costs(self) -> dict[str, float]:
        return {name.strip(): float(price) for name, _, price in (c.partition("=") for c in self.engine_cost)}


class _Environ(EnvSettingsSource):
    """The environment source over a given mapping (tests pass one; the server reads ``os.environ``)."""

    def __init__(self, settings_cls, environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self):
        prefix = ("HF_TOKEN", "HF_HOME", "TTS_")
        return {k.lower(): v for k, v in self._environ.items() if k.upper().startswith(prefix)}


class Option:
    """One field as the command line and the environment name it."""

    def __init__(self, name: str, field) -> None:
        self.name, self.field = name, field
        self.flag = "--" + name.replace("_", "-")
        self.env = "TTS_" + name.upper()
        self.default = field.default
        self.choices = get_args(field.annotation.__args__[0] if _optional(field.annotation) else field.annotation) \
            if _literal(field.annotation) else None
        self.multiple = name in ("engine_cost", "piper_voice")
        self.const = (field.json_schema_extra or {}).get("const")


def _optional(annotation) -> bool:
    return type(None) in get_args(annotation)


def _literal(annotation) -> bool:
    inner = get_args(annotation)[0] if _optional(annotation) else annotation
    return getattr(inner, "__origin__", None) is Literal


OPTIONS = [Option(name, field) for name, field in Settings.model_fields.items() if name not in ENV_ONLY]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=Path(sys.argv[0]).name if Path(sys.argv[0]).name == "csm-tts-server" else "run_server.py",
        description="WebSocket text-to-speech server for Sesame CSM-1B.",
        epilog="Every option can also be set as TTS_<OPTION> in the environment or .env "
               "(e.g. TTS_PORT=9000); flags win over the environment.")
    for opt in OPTIONS:
        extra: dict[str, Any] = {"nargs": "?", "const": opt.const} if opt.const is not None else {}
        if opt.multiple:
            extra["action"] = "append"
        default = opt.default if opt.default != () else "none"
        parser.add_argument(opt.flag, dest=opt.name, default=argparse.SUPPRESS, choices=opt.choices,
                            help=f"{opt.field.description} (env {opt.env}; default {default})", **extra)
    return parser


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
                  dotenv_path: str | os.PathLike | None = ".env") -> Settings:
    """Flags, then the environment, then ``.env``; a bad value exits with code 2 naming the option."""
    parser = build_parser()
    flags = vars(parser.parse_args(argv))
    env = os.environ if environ is None else environ
    dotenv = dotenv_path if dotenv_path is not None and Path(dotenv_path).is_file() else None

    class Sourced(Settings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                       file_secret_settings):
            return init_settings, _Environ(settings_cls, env), dotenv_settings

    try:
        return Sourced(_env_file=dotenv, **flags)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        name = str(error["loc"][0]) if error["loc"] else ""
        cause = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
        where = f"{'--' + name.replace('_', '-')} (env TTS_{name.upper()}): " if name else ""
        parser.error(where + cause)
