"""OpenAI's speech API, as rules: parse and validate ``POST /v1/audio/speech``, list voices and models, shape errors.

Pure functions only (no sockets, no model), like ``protocol`` for the WebSocket;
``openai_api`` does the I/O.  The contract is OpenAI's (``input``, ``voice``,
``response_format``, ``speed``, ``instructions``, ``stream_format``) plus a few
fields of ours; ``docs/openai.md`` is the prose version.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from . import protocol as p
from .audio import STREAM_RATES

# OpenAI's voices, each a fixed CSM speaker id, so an off-the-shelf client always gets the same voice for a name
# (give those ids default voices in voices.json to fix how they sound).
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
                 "marin", "cedar")
VOICE_SPEAKERS = {name: index for index, name in enumerate(OPENAI_VOICES)}
# Model names clients send -> our engine (None: the engine chain's routing).
MODELS = {"tts-1": None, "tts-1-hd": None, "gpt-4o-mini-tts": None, "csm-1b": None, "csm": "csm", "piper": "piper",
          "remote": "remote"}
CONTENT_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
                 "wav": "audio/wav", "pcm": "audio/pcm"}
SPEEDS = (0.25, 4.0)
MAX_INSTRUCTIONS = 4096
# Our WebSocket error codes as HTTP statuses.
STATUS = {"invalid_json": 400, "invalid_request": 400, "unknown_emotion": 400, "unsupported_language": 400,
          "text_too_long": 413, "busy": 429,
          "rate_limited": 429, "too_many_queued": 429, "model_unavailable": 503, "shutting_down": 503,
          "generation_timeout": 504, "generation_failed": 500, "internal_error": 500, "client_too_slow": 408}


class ApiError(Exception):
    """A request answered with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> bytes:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return json.dumps({"error": {"message": self.message, "type": kind, "param": self.param,
                                     "code": self.code}}).encode()

    @classmethod
    def from_reply(cls, reply: dict[str, Any]) -> "ApiError":
        """An error reply of the shared core (WebSocket codes) as an HTTP error."""
        return cls(STATUS.get(reply["code"], 500), reply["message"], None, reply["code"])


@dataclass(frozen=True)
class SpeechRequest:
    synthesis: p.SynthesisRequest  # what the scheduler runs: always streamed 16-bit PCM
    response_format: str = "mp3"
    stream_format: str = "audio"
    sample_rate: int | None = None  # None: the server's --sample-rate


@dataclass(frozen=True)
class Voices:
    """What a ``voice`` may name on this server: OpenAI's names, speaker ids, and names from voices.json."""

    named: dict[str, int]  # voices.json "name" -> speaker id

    def resolve(self, voice: Any) -> int:
        if isinstance(voice, dict):  # OpenAI also accepts {"id": "..."}
            voice = voice.get("id")
        if not isinstance(voice, str) or not voice:
            raise ApiError(400, "'voice' is required: a voice name (e.g. 'alloy') or a speaker id", "voice")
        if voice in self.named:
            return self.named[voice]
        if voice.lower() in VOICE_SPEAKERS:
            return VOICE_SPEAKERS[voice.lower()]
        if voice.isascii() and voice.isdigit() and int(voice) <= p.MAX_SPEAKER:
            return int(voice)
        raise ApiError(404, f"Voice {voice!r} not found; see GET /v1/audio/voices", "voice", "voice_not_found")

    def listing(self) -> list[dict[str, Any]]:
        listed = [{"id": name, "name": name, "speaker": speaker} for name, speaker in VOICE_SPEAKERS.items()]
        return listed + [{"id": name, "name": name, "speaker": speaker} for name, speaker in sorted(self.named.items())]


def parse_speech(raw: bytes, limits: p.Limits, voices: Voices) -> SpeechRequest:
    """Validate a ``/v1/audio/speech`` body; ``ApiError`` names the offending field."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "The request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object")
    fields = p.Fields(data)  # the WebSocket's typed-field readers, for our own extra fields
    try:
        return _speech(data, fields, limits, voices)
    except p.ProtocolError as exc:  # a WebSocket rule broken by one of our extra fields
        raise ApiError(STATUS.get(exc.code.value, 400), exc.message, _named_field(exc.message), exc.code.value) \
            from None


def _speech(data: dict, fields: p.Fields, limits: p.Limits, voices: Voices) -> SpeechRequest:
    model = data.get("model", "tts-1")
    if not isinstance(model, str) or model not in MODELS:
        raise ApiError(404, f"Model {model!r} not found; use one of: {', '.join(MODELS)}", "model", "model_not_found")
    text = data.get("input")
    if not isinstance(text, str) or not text.strip():
        raise ApiError(400, "'input' is required and must be a non-empty string", "input")
    if len(text.strip()) > limits.max_text_chars:
        raise ApiError(413, f"'input' has {len(text.strip())} characters; the limit is {limits.max_text_chars}",
                       "input", "text_too_long")
    speaker = voices.resolve(data.get("voice"))
    if data.get("speaker") is not None:  # ours: an explicit speaker id wins over the voice's
        speaker = fields.integer("speaker", 0, 0, p.MAX_SPEAKER)
    response_format = _choice(data, "response_format", "mp3", tuple(CONTENT_TYPES))
    stream_format = _choice(data, "stream_format", "audio", ("audio", "sse"))
    speed = data.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not math.isfinite(speed) \
            or not SPEEDS[0] <= speed <= SPEEDS[1]:
        raise ApiError(400, f"'speed' must be a number from {SPEEDS[0]} to {SPEEDS[1]}", "speed")
    emotion = data.get("emotion")
    instructions = data.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str) or len(instructions) > MAX_INSTRUCTIONS:
            raise ApiError(400, f"'instructions' must be a string of at most {MAX_INSTRUCTIONS} characters",
                           "instructions")
        if emotion is None and instructions.strip().lower() in limits.emotions:
            emotion = instructions.strip().lower()  # instructions naming one of our emotions pick it; else ignored
    if emotion is not None and (not isinstance(emotion, str) or emotion not in limits.emotions):
        known = ", ".join(limits.emotions) or "none are configured"
        raise ApiError(400, f"Unknown emotion {emotion!r}; available: {known}", "emotion", "unknown_emotion")
    sample_rate = fields.integer("sample_rate", None, 8000, 48000)
    if sample_rate is not None and response_format in STREAM_RATES and sample_rate not in STREAM_RATES[response_format]:
        rates = ", ".join(map(str, STREAM_RATES[response_format]))
        raise ApiError(400, f"'sample_rate' {sample_rate} is not possible for {response_format}; use one of: {rates}",
                       "sample_rate")
    synthesis = p.SynthesisRequest(
        text=text.strip(), request_id=p.new_request_id(), speaker=speaker,
        seed=fields.integer("seed", None, 0, 2**63 - 1),
        temperature=fields.number("temperature", p.DEFAULT_TEMPERATURE, 0.0, 2.0, low_open=True),
        top_k=fields.integer("top_k", p.DEFAULT_TOP_K, 1, 1_000_000),
        max_audio_length_ms=fields.number("max_audio_length_ms", None, p.MIN_AUDIO_MS, p.MAX_AUDIO_MS),
        format="pcm", stream=True, context=fields.boolean("context", False), emotion=emotion,
        engine=MODELS[model], speed=float(speed), language=fields.language())
    return SpeechRequest(synthesis, response_format, stream_format, sample_rate)


def models(primary: str, engines: list[str]) -> dict[str, Any]:
    """``GET /v1/models`` in OpenAI's list shape: the names clients send, and the engine each one means."""
    data = [{"id": name, "object": "model", "created": 0, "owned_by": f"csm-tts-server:{engine or primary}"}
            for name, engine in MODELS.items() if (engine or primary) in engines]
    return {"object": "list", "data": data}


def sse_event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def _choice(data: dict, name: str, default: str, choices: tuple[str, ...]) -> str:
    value = data.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str) or value not in choices:
        raise ApiError(400, f"'{name}' must be one of: {', '.join(choices)}", name)
    return value


def _named_field(message: str) -> str | None:
    """The field a WebSocket-rule message names (``'seed' must be ...``)."""
    return message.split("'")[1] if message.startswith("'") and message.count("'") >= 2 else None
