"""Settings from the command line, the environment and ``.env``.

Precedence: command-line flag > environment variable > ``.env`` file > default.
Every option ``--some-option`` has the variable ``TTS_SOME_OPTION``; the hub's
own ``HF_TOKEN`` and ``HF_HOME`` are read as they are.  ``.env.template``
lists them all.  ``HF_TOKEN`` is kept out of ``repr`` so it never reaches a log.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from .protocol import ENGINES, LANGUAGE_CODE

DEFAULT_REFERENCES = Path(__file__).resolve().parent.parent / "references"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _networks(text: str) -> str:
    import ipaddress

    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not an IP address or network") from None
    return text


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number, 0 or more, got {text}")
    return value


def _engines(text: str) -> str:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in ENGINES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: list engines from {', '.join(ENGINES)}, e.g. csm,piper")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} names an engine twice")
    return ",".join(names)


def _remote_voices(text: str) -> str:
    for entry in filter(None, (part.strip() for part in text.split(","))):
        ours, sep, theirs = (s.strip() for s in entry.partition("="))
        if not (sep and ours and theirs):
            raise argparse.ArgumentTypeError(f"{entry!r} is not SPEAKER=REMOTE_VOICE")
    return text  # the names are checked once the references folder is known (load_settings)


def _languages(text: str) -> str:
    for part in filter(None, (p.strip() for p in text.split(","))):
        if not LANGUAGE_CODE.fullmatch(part):
            raise argparse.ArgumentTypeError(f"{part!r} is not a language code such as en, de or en_US")
    return text


def _cost(text: str) -> str:
    name, sep, price = text.partition("=")
    try:
        ok = bool(sep) and name.strip() in ENGINES and float(price) >= 0
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{text!r} is not ENGINE=USD_PER_MILLION_CHARS (e.g. remote=15)")
    return text


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (0-65535), got {value}")
    return value


def _wyoming_uri(text: str) -> str:
    from urllib.parse import urlparse

    parsed = urlparse(text)
    if parsed.scheme == "tcp" and parsed.hostname and parsed.port is not None:
        return text
    if parsed.scheme == "unix" and parsed.path:
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not tcp://HOST:PORT or unix:///PATH")


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    help: str
    type: Callable[[str], Any] = str
    choices: Sequence[str] | None = None
    const: Any = None  # the value of the bare flag, for options whose value is optional
    multiple: bool = False  # the flag may repeat (the variable separates values with commas); a tuple

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "TTS_" + self.name.upper()


OPTIONS = [
    Option("host", "0.0.0.0", "address to listen on"),
    Option("port", 8765, "port for WebSocket and HTTP (0 picks a free one)", _port),
    Option("mode", "download", "download: fetch --model-id from the hub; reuse: load --model-path",
           choices=["download", "reuse"]),
    Option("model_path", None, "model folder (with config.json) or hub cache folder models--org--name"),
    Option("model_id", "sesame/csm-1b", "hub repository to download in download mode"),
    Option("device", "auto", "auto = cuda, then mps, then cpu", choices=["auto", "cuda", "mps", "cpu"]),
    Option("dtype", "auto", "auto = bfloat16 on CUDA when supported, and on a CPU that computes bfloat16 natively "
           "(AVX512-BF16 or AMX) or with --quantize int8; else float32",
           choices=["auto", "float32", "bfloat16", "float16"]),
    Option("references", str(DEFAULT_REFERENCES), "folder with emotion_map.json and reference clips"),
    Option("log_level", "INFO", "logging level", choices=["DEBUG", "INFO", "WARNING", "ERROR"]),
    Option("max_text_chars", 4000, "longest accepted text, in characters", _positive),
    Option("max_queue", 32, "most requests waiting at once; beyond it requests get 'busy'", _positive),
    Option("engines", None, "the engine chain, in routing order, e.g. csm,remote,piper: a request goes to the "
           "first engine that has not failed (waiting while it loads) and is retried on the next when one fails "
           "before any audio; unset: as --engine and --fallback say (csm,piper)", _engines),
    Option("engine", "auto", "shorthand for --engines: auto = csm,FALLBACK; csm or piper: that engine only",
           choices=["auto", "csm", "piper"]),
    Option("fallback", "piper", "the engine after CSM in auto mode (shorthand for --engines csm,piper)",
           choices=["piper", "none"]),
    Option("overflow_engine", None, "when the queue is full, requests that named no engine go to this engine of "
           "the chain instead of getting 'busy'; off when unset", choices=list(ENGINES)),
    Option("remote_url", None, "base URL of an OpenAI-compatible speech API for the 'remote' engine, e.g. "
           "https://api.openai.com/v1 or http://gpu-box:8765/v1 (key: env TTS_REMOTE_API_KEY)"),
    Option("remote_model", "tts-1", "model name sent to the remote engine"),
    Option("remote_voices", None, "speaker ids (or OpenAI or voices.json voice names) to the remote's voices, e.g. "
           "0=af_bella,1=am_adam; unmapped ids take OpenAI's voice of that number (0 alloy, 1 ash, ...)",
           _remote_voices),
    Option("remote_languages", None, "comma-separated languages the remote engine speaks (e.g. en,de,fr); unset: "
           "it gets requests in any language", _languages),
    Option("remote_timeout", 30, "seconds to wait for the remote engine to connect or send more audio", _positive),
    Option("cache_mb", 256.0, "response cache size in MiB for requests with a seed and context off (CSM only); "
           "0 = off", _non_negative_float),
    Option("engine_cost", (), "ENGINE=USD_PER_MILLION_CHARS for the estimated spend in /v1/info and /metrics; "
           "repeat for several engines", _cost, multiple=True),
    Option("sample_rate", 24000, "output sample rate in Hz; every engine is resampled to it", _positive),
    Option("first_chunk_frames", 2, "CSM frames (80 ms each) in a request's first audio chunk", _positive),
    Option("chunk_frames", 6, "CSM frames in each later audio chunk", _positive),
    Option("max_batch", 0, "CSM requests generated together in one batch; 0 = auto: 8 on CUDA, 4 on CPU (where "
           "more rows than 4 cost a lone request more than they save), 1 on MPS", _non_negative),
    Option("threads", 0, "CPU threads for CSM's compute; 0 = torch's default (all cores). Running several servers "
           "on one machine's CPU, give each cores / servers", _non_negative),
    Option("quantize", "none", "int8: CSM's backbone, depth decoder and heads with int8 weights (per-output-channel "
           "scales, weight-only), ~4x fewer bytes read than float32; none: as --dtype says", choices=["none", "int8"]),
    Option("compile", "off", "on: torch.compile CSM's depth-decoder step (for CUDA; ~30 s warm-up, no gain on CPU)",
           choices=["on", "off"]),
    Option("stream_buffer_seconds", 30, "most seconds of audio a connection may leave unread before its stream "
           "is stopped with 'client_too_slow'", _positive),
    Option("pin_voices", "off", "on: a speaker's first CSM generation of 2 s or more becomes its default voice "
           "for every client (for a server whose clients you trust: one client's request picks everyone's voice)",
           choices=["on", "off"]),
    Option("max_context_turns", 8, "turns of conversation history kept per connection", _positive),
    Option("api_key", None, "comma-separated API keys; when set, WebSocket and HTTP (except /health) need one"),
    Option("allowed_origins", None, "comma-separated browser origins allowed besides the server's own; * = any"),
    Option("trusted_proxies", None, "comma-separated addresses or networks of reverse proxies (e.g. 127.0.0.1 "
           "for nginx on this host) whose X-Forwarded-For names the client for the per-address limits", _networks),
    Option("max_connections", 256, "most open WebSocket connections", _positive),
    Option("max_connections_per_address", 16, "most open connections from one client address", _positive),
    Option("rate_limit", 120, "most synthesis and voice requests a minute per connection", _positive),
    Option("max_queued_per_connection", 8, "most requests one connection may have waiting or running", _positive),
    Option("max_frame_bytes", 16 * 2**20, "largest WebSocket frame; larger ones close that connection (1009)",
           _positive),
    Option("max_voice_bytes", 10 * 2**20, "largest voice-prompt upload in bytes", _positive),
    Option("max_voice_seconds", 30, "longest voice-prompt upload in seconds", _positive),
    Option("generation_timeout", 120, "seconds an engine may go without producing audio before the request "
           "is abandoned ('generation_timeout') and a fresh worker takes over", _positive),
    Option("shutdown_grace", 30, "on SIGTERM/Ctrl-C, seconds running requests may take to finish", _positive),
    Option("wyoming_uri", None, "also serve the Wyoming protocol (Home Assistant, Rhasspy) here, e.g. "
           "tcp://0.0.0.0:10200; off when unset", _wyoming_uri),
    Option("wyoming_zeroconf", None, "announce the Wyoming server over zeroconf (mDNS) under this name so Home "
           "Assistant discovers it; the bare flag uses 'csm-tts'", const="csm-tts"),
    Option("piper_voice", (), "a Piper voice .onnx (with its .onnx.json beside it) or a folder of them; repeat for "
           "several languages (a request's 'language' picks one; the first is the default); default "
           "en_US-joe-medium", multiple=True),
]


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 8765
    mode: str = "download"
    model_path: str | None = None
    model_id: str = "sesame/csm-1b"
    device: str = "auto"
    dtype: str = "auto"
    references: str = str(DEFAULT_REFERENCES)
    log_level: str = "INFO"
    max_text_chars: int = 4000
    max_queue: int = 32
    engines: str | None = None
    engine: str = "auto"
    fallback: str = "piper"
    overflow_engine: str | None = None
    remote_url: str | None = None
    remote_model: str = "tts-1"
    remote_voices: str | None = None
    remote_languages: str | None = None
    remote_timeout: int = 30
    cache_mb: float = 256.0
    engine_cost: tuple[str, ...] = ()
    sample_rate: int = 24000
    piper_voice: tuple[str, ...] = ()
    pin_voices: str = "off"
    max_context_turns: int = 8
    max_batch: int = 0
    threads: int = 0
    compile: str = "off"
    quantize: str = "none"
    first_chunk_frames: int = 2
    chunk_frames: int = 6
    stream_buffer_seconds: int = 30
    api_key: str | None = field(default=None, repr=False)
    allowed_origins: str | None = None
    trusted_proxies: str | None = None
    wyoming_uri: str | None = None
    wyoming_zeroconf: str | None = None
    max_connections: int = 256
    max_connections_per_address: int = 16
    rate_limit: int = 120
    max_queued_per_connection: int = 8
    max_frame_bytes: int = 16 * 2**20
    max_voice_bytes: int = 10 * 2**20
    max_voice_seconds: int = 30
    generation_timeout: int = 120
    shutdown_grace: int = 30
    hf_token: str | None = field(default=None, repr=False)
    hf_home: str | None = None
    remote_api_key: str | None = field(default=None, repr=False)

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_server.py", description="WebSocket text-to-speech server for Sesame CSM-1B.",
        epilog="Every option can also be set as TTS_<OPTION> in the environment or .env "
               "(e.g. TTS_PORT=9000); flags win over the environment.")
    for opt in OPTIONS:
        optional = {"nargs": "?", "const": opt.const} if opt.const is not None else {}
        if opt.multiple:
            optional["action"] = "append"
        default = opt.default if opt.default != () else "none"
        parser.add_argument(opt.flag, dest=opt.name, default=None, choices=opt.choices, type=opt.type,
                            help=f"{opt.help} (env {opt.env}; default {default})", **optional)
    return parser


def load_settings(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None,
                  dotenv_path: str | os.PathLike | None = ".env") -> Settings:
    """Merge flags, environment and ``.env`` (read without overriding the real environment)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    env = dict(os.environ if environ is None else environ)
    if dotenv_path is not None and Path(dotenv_path).is_file():
        from dotenv import dotenv_values

        for key, value in dotenv_values(dotenv_path).items():
            if value is not None:
                env.setdefault(key, value)
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        value = getattr(args, opt.name)
        if value is None and env.get(opt.env, "") != "":
            raw = env[opt.env]
            try:
                value = [opt.type(v.strip()) for v in raw.split(",") if v.strip()] if opt.multiple else opt.type(raw)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{opt.env}={raw!r}: {exc}")
            if opt.choices and value not in opt.choices:
                parser.error(f"{opt.env}={raw!r}: choose from {', '.join(opt.choices)}")
        values[opt.name] = opt.default if value is None else tuple(value) if opt.multiple else value
    if values["wyoming_zeroconf"] and not str(values["wyoming_uri"] or "").startswith("tcp://"):
        parser.error("--wyoming-zeroconf needs a tcp:// --wyoming-uri")
    known = {f.name for f in fields(Settings)}
    values = {k: v for k, v in values.items() if k in known}
    settings = Settings(**values, hf_token=env.get("HF_TOKEN") or None, hf_home=env.get("HF_HOME") or None,
                        remote_api_key=env.get("TTS_REMOTE_API_KEY") or None)
    chain = settings.chain()
    if "remote" in chain and not settings.remote_url:
        parser.error("the 'remote' engine needs --remote-url (or TTS_REMOTE_URL)")
    try:
        settings.remote_voice_map()
    except ValueError as exc:
        parser.error(f"--remote-voices: {exc}")
    if settings.overflow_engine and settings.overflow_engine not in chain[1:]:
        parser.error(f"--overflow-engine {settings.overflow_engine} must be an engine of the chain after the first "
                     f"({','.join(chain)})")
    return settings
