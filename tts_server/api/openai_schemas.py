"""OpenAI's speech API as a pydantic model and rules: the ``/v1/audio/speech`` body, voices, models, errors.

Pure (no sockets, no model), like ``schemas`` for the WebSocket; ``openai``
does the I/O.  The contract is OpenAI's (``input``, ``voice``,
``response_format``, ``speed``, ``instructions``, ``stream_format``) plus
fields of ours; the same model gives ``/openapi.json`` its request schema.
docs/openai.md is the prose version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..audio.codec import STREAM_RATES
from ..core.replies import ErrorCode, Refusal
from ..engines import registry
from ..engines.request import (DEFAULT_TEMPERATURE, DEFAULT_TOP_K, MAX_AUDIO_MS, MAX_SEED,
                               MAX_SPEAKER, MIN_AUDIO_MS, OPENAI_VOICES, SynthesisRequest, new_request_id)
from .dialogue_schemas import SessionId
from .schema_rules import (LANGUAGE_PATTERN, LANGUAGE_RULE, SPEAKABLE_RULE, Limits, field_message, loads_shallow,
                           non_empty, null_is_unset)

VOICE_SPEAKERS = {name: index for index, name in enumerate(OPENAI_VOICES)}
# Model names that keep the engine chain's routing (OpenAI's, and this server's own); each registered engine's name
# and aliases pick that engine (``model_engines``).
ROUTED_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "csm-1b")


def model_engines() -> dict[str, str | None]:
    """Model names clients send -> our engine (None: the engine chain's routing), as the registry has them now."""
    named = {alias: spec.name for spec in registry.specs() for alias in (spec.name, *spec.aliases)}
    return {**dict.fromkeys(ROUTED_MODELS), **named}


CONTENT_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
                 "wav": "audio/wav", "pcm": "audio/pcm", "vtt": "text/vtt", "srt": "application/x-subrip"}
CAPTIONS = ("vtt", "srt")  # captions of the text with its word times instead of audio
MAX_INSTRUCTIONS = 4096
# Our error codes as HTTP statuses: the one place a refusal becomes an HTTP answer (``http_error``).
STATUS = {ErrorCode.INVALID_JSON: 400, ErrorCode.INVALID_REQUEST: 400, ErrorCode.UNKNOWN_SESSION: 404,
          ErrorCode.UNKNOWN_EMOTION: 400, ErrorCode.UNSUPPORTED_LANGUAGE: 400, ErrorCode.INVALID_VOICE: 400,
          ErrorCode.UNKNOWN_REQUEST: 404, ErrorCode.TEXT_TOO_LONG: 413, ErrorCode.REQUEST_TOO_LARGE: 413,
          ErrorCode.BUSY: 429, ErrorCode.RATE_LIMITED: 429, ErrorCode.TOO_MANY_QUEUED: 429,
          ErrorCode.TOO_MANY_SESSIONS: 429, ErrorCode.STORE_UNAVAILABLE: 503, ErrorCode.TOO_MANY_CONNECTIONS: 503,
          ErrorCode.MODEL_UNAVAILABLE: 503, ErrorCode.SHUTTING_DOWN: 503, ErrorCode.CANCELLED: 503,
          ErrorCode.GENERATION_TIMEOUT: 504, ErrorCode.GENERATION_FAILED: 500, ErrorCode.INTERNAL_ERROR: 500,
          ErrorCode.CLIENT_TOO_SLOW: 408, ErrorCode.MODEL_NOT_FOUND: 404, ErrorCode.VOICE_NOT_FOUND: 400,
          ErrorCode.INVALID_API_KEY: 401, ErrorCode.NOT_FOUND: 404, ErrorCode.METHOD_NOT_ALLOWED: 405}
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def http_error(refusal: Refusal) -> tuple[int, dict[str, Any]]:
    """A refusal as HTTP's answer: its status and OpenAI's error body."""
    status = STATUS.get(refusal.code, 500)
    return status, error_body(status, refusal.message, refusal.param, refusal.code.value)


class SpeechBody(BaseModel):
    """``POST /v1/audio/speech``: OpenAI's fields, then ours (a client that sends only OpenAI's is served)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str = Field("tts-1", description=f"one of: {', '.join(model_engines())}")
    input: str = Field(description=SPEAKABLE_RULE)
    voice: str | dict[str, Any] = Field(description="a voice name (e.g. 'alloy', or one from GET /v1/audio/voices), "
                                                    "a speaker id as a string, or {\"id\": name}")
    response_format: Literal[tuple(CONTENT_TYPES)] = Field("mp3", description=f"one of: {', '.join(CONTENT_TYPES)}")
    speed: float = Field(1.0, ge=0.25, le=4.0, allow_inf_nan=False, description="a number from 0.25 to 4.0")
    instructions: str | None = Field(None, max_length=MAX_INSTRUCTIONS,
                                     description=f"a string of at most {MAX_INSTRUCTIONS} characters; one naming a "
                                                 "configured emotion picks it")
    stream_format: Literal["audio", "sse"] = Field("audio", description="one of: audio, sse")
    # ours
    speaker: int | None = Field(None, ge=0, le=MAX_SPEAKER, description=f"an integer from 0 to {MAX_SPEAKER} "
                                                                        "(wins over the voice's speaker)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description=f"an integer from 0 to {MAX_SEED}")
    temperature: float = Field(DEFAULT_TEMPERATURE, gt=0.0, le=2.0, allow_inf_nan=False,
                               description="a number above 0 and at most 2")
    top_k: int = Field(DEFAULT_TOP_K, ge=1, le=1_000_000, description="an integer from 1 to 1000000")
    max_audio_length_ms: float | None = Field(None, ge=MIN_AUDIO_MS, le=MAX_AUDIO_MS, allow_inf_nan=False,
                                              description=f"a number from {MIN_AUDIO_MS} to {MAX_AUDIO_MS}")
    context: bool = Field(False, description="true or false (the speaker's default voice as context)")
    emotion: str | None = Field(None, description="the name of a configured emotion (see /v1/info)")
    sample_rate: int | None = Field(None, ge=8000, le=48000, description="an integer from 8000 to 48000")
    language: str | None = Field(None, pattern=LANGUAGE_PATTERN, description=LANGUAGE_RULE)
    session: SessionId | None = Field(None, description="a session (from the WebSocket's 'session' message): its "
                                                        "turns are the context, and this reply joins them")
    timestamps: bool = Field(False, description="true or false (with stream_format 'sse': speech.words events)")

    _input = field_validator("input")(non_empty)

    _nulls = model_validator(mode="before")(null_is_unset)  # OpenAI's SDKs may send null for unset fields

    def to_request(self, speaker: int, emotion: str | None, engine: str | None) -> SynthesisRequest:
        """What the scheduler runs, always streamed 16-bit PCM: the fields named like the request's are its fields;
        what the server resolves (``voice`` to a speaker, ``instructions`` to an emotion, ``model`` to an engine) is
        given; a session or captions imply context or word times."""
        return SynthesisRequest.of(dict(self), text=self.input, request_id=new_request_id(), speaker=speaker,
                                   emotion=emotion, engine=engine, format="pcm", stream=True,
                                   context=self.context or self.session is not None,
                                   timestamps=self.timestamps or self.response_format in CAPTIONS)


@dataclass(frozen=True)
class SpeechRequest:
    synthesis: SynthesisRequest  # what the scheduler runs: always streamed 16-bit PCM
    response_format: str = "mp3"
    stream_format: str = "audio"
    sample_rate: int | None = None  # None: the server's --sample-rate
    session: str | None = None  # a session whose turns are the context, and which the reply extends


@dataclass(frozen=True)
class Voices:
    """What a ``voice`` may name on this server: OpenAI's names, speaker ids, and names from voices.json."""

    named: dict[str, int]  # voices.json "name" -> speaker id

    def resolve(self, voice: Any) -> int:
        if isinstance(voice, dict):  # OpenAI also accepts {"id": "..."}
            voice = voice.get("id")
        if not isinstance(voice, str) or not voice:
            raise Refusal(ErrorCode.INVALID_REQUEST, "'voice' is required: a voice name (e.g. 'alloy') or a "
                                                     "speaker id", param="voice")
        if voice in self.named:
            return self.named[voice]
        if voice.lower() in VOICE_SPEAKERS:
            return VOICE_SPEAKERS[voice.lower()]
        if voice.isascii() and voice.isdigit() and len(voice) < 12 and int(voice) <= MAX_SPEAKER:
            return int(voice)
        raise Refusal(ErrorCode.VOICE_NOT_FOUND, f"Voice {voice!r} not found; see GET /v1/audio/voices", param="voice")

    def listing(self) -> list[dict[str, Any]]:
        listed = [{"id": name, "name": name, "speaker": speaker} for name, speaker in VOICE_SPEAKERS.items()]
        return listed + [{"id": name, "name": name, "speaker": speaker} for name, speaker in sorted(self.named.items())]


def parse_speech(raw: bytes, limits: Limits, voices: Voices) -> SpeechRequest:
    """Validate a ``/v1/audio/speech`` body; the ``Refusal`` names the offending field (``param``)."""
    try:
        data = loads_shallow(raw)
    except (ValueError, RecursionError):
        raise Refusal(ErrorCode.INVALID_JSON, "The request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise Refusal(ErrorCode.INVALID_REQUEST, "The request body must be a JSON object")
    try:
        body = SpeechBody.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        param = str(error["loc"][0]) if error["loc"] else None
        code = ErrorCode.MODEL_NOT_FOUND if param == "model" else ErrorCode.INVALID_REQUEST
        raise Refusal(code, field_message(SpeechBody, exc), param=param) from None
    known = model_engines()
    if body.model not in known:
        raise Refusal(ErrorCode.MODEL_NOT_FOUND, f"Model {body.model!r} not found; use one of: "
                                                 f"{', '.join(known)}", param="model")
    if len(body.input) > limits.max_text_chars:
        raise Refusal(ErrorCode.TEXT_TOO_LONG, f"'input' has {len(body.input)} characters; the limit is "
                                               f"{limits.max_text_chars}", param="input")
    speaker = body.speaker if body.speaker is not None else voices.resolve(body.voice)
    emotion = body.emotion
    if emotion is None and body.instructions and body.instructions.strip().lower() in limits.emotions:
        emotion = body.instructions.strip().lower()  # instructions naming one of our emotions pick it; else ignored
    if emotion is not None and emotion not in limits.emotions:
        known = ", ".join(limits.emotions) or "none are configured"
        raise Refusal(ErrorCode.UNKNOWN_EMOTION, f"Unknown emotion {emotion!r}; available: {known}", param="emotion")
    if body.response_format in CAPTIONS and body.stream_format == "sse":
        raise Refusal(ErrorCode.INVALID_REQUEST, f"'{body.response_format}' captions are one file; for audio with "
                                                 "word times use stream_format 'sse' with an audio format and "
                                                 "'timestamps': true", param="stream_format")
    rates = STREAM_RATES.get(body.response_format)
    if body.sample_rate is not None and rates and body.sample_rate not in rates:
        raise Refusal(ErrorCode.INVALID_REQUEST, f"'sample_rate' {body.sample_rate} is not possible for "
                                                 f"{body.response_format}; use one of: {', '.join(map(str, rates))}",
                      param="sample_rate")
    synthesis = body.to_request(speaker, emotion, known[body.model])
    return SpeechRequest(synthesis, body.response_format, body.stream_format, body.sample_rate, body.session)


def models(primary: str, engines: list[str]) -> dict[str, Any]:
    """``GET /v1/models`` in OpenAI's list shape: the names clients send, and the engine each one means."""
    data = [{"id": name, "object": "model", "created": 0, "owned_by": f"csm-tts-server:{engine or primary}"}
            for name, engine in model_engines().items() if (engine or primary) in engines]
    return {"object": "list", "data": data}


def sse_event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


__all__ = ["ErrorCode", "SpeechBody", "SpeechRequest", "Voices", "model_engines", "models", "parse_speech", "sse_event"]
