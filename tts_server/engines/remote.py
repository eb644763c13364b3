"""A remote engine: any OpenAI-compatible speech endpoint (OpenAI, Kokoro-FastAPI, AllTalk, another of us, ...).

Each request becomes one ``POST {url}/audio/speech`` made with the official
``openai`` SDK, asking for ``pcm`` (OpenAI's 24 kHz, 16-bit mono; another rate
named in an ``X-Sample-Rate`` header, as ours sends, is resampled) and reading
the body as it arrives, so audio flows on to the client while the remote still
speaks.  The remote's failures become ours: 429 -> ``busy``, unreachable,
timed out, 401/403 or 5xx -> ``model_unavailable``, any other refusal ->
``generation_failed``; before any audio each one hands the request to the next
engine of the chain.  The SDK's own retries are off: the chain is the retry.

Speaker ids map to remote voice names (``voices``); an unmapped id takes
OpenAI's voice of the same number (0 alloy, 1 ash, ... as our own API numbers
them), and ids past those take the first.  The key is sent as a bearer token
and never logged or described; the address is shown without credentials or
query secrets, and a refusal as its status, the remote's own text only logged.  A remote engine is not ``seedable``: its audio
is never cached.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Sequence

import numpy as np

from ..audio.codec import Resampler
from ..audio.pcm import WholeSamples, to_float
from .addresses import client_address, public_url, scrub, status_summary
from .base import Engine, EngineError, SynthesisTask
from .errors import ErrorCode
from .request import MAX_AUDIO_MS, OPENAI_VOICES

log = logging.getLogger(__name__)
READ_BYTES = 4800  # 0.1 s of 24 kHz 16-bit audio: the most we wait for before passing audio on
AUDIO_TYPES = ("audio/", "application/octet-stream")  # what a remote's pcm may be labelled


def parse_voices(text: str | None, names: dict[str, int] | None = None) -> dict[int, str]:
    """``"0=alloy,nova=af_bella,narrator=onyx"`` -> {speaker id: remote voice}; an OpenAI voice name, or one of
    ``names`` (voices.json's), as the key means its speaker id.  Raises ``ValueError`` naming a bad entry."""
    mapping: dict[int, str] = {}
    for entry in filter(None, (part.strip() for part in (text or "").split(","))):
        ours, sep, theirs = (s.strip() for s in entry.partition("="))
        if not sep or not ours or not theirs:
            raise ValueError(f"{entry!r} is not SPEAKER=REMOTE_VOICE")
        if ours.isascii() and ours.isdigit():
            mapping[int(ours)] = theirs
        elif names and ours in names:
            mapping[names[ours]] = theirs
        elif ours.lower() in OPENAI_VOICES:
            mapping[OPENAI_VOICES.index(ours.lower())] = theirs
        else:
            raise ValueError(f"{ours!r} in {entry!r} is neither a speaker id, an OpenAI voice name nor a name in "
                             "voices.json")
    return mapping


class RemoteEngine(Engine):
    name = "remote"
    sample_rate = 24000  # OpenAI's pcm
    words = "the remote engine's speech API gives no word times"

    def __init__(self, url: str, api_key: str | None = None, model: str = "tts-1", voices: dict[int, str] | None = None,
                 languages: Sequence[str] | None = None, timeout: float = 30, concurrency: int = 4) -> None:
        self._url = url.rstrip("/")
        self.url = public_url(self._url)  # what is shown: no credentials, no query secrets
        self._api_key = api_key
        self.model = model
        self.voices = dict(voices or {})
        self._languages = tuple(languages) if languages else None
        self.timeout = timeout
        self.concurrency = concurrency  # requests in flight to the remote at once (it queues the rest itself)
        self._client = None

    def __repr__(self) -> str:  # no key, ever
        return f"RemoteEngine(url={self.url!r}, model={self.model!r})"

    def load(self) -> None:
        """Make the client; nothing is sent (a remote that is down now may be up by the first request)."""
        from openai import OpenAI

        base, query = client_address(self._url)  # a query in the address goes on every request, after the path
        self._client = OpenAI(base_url=base, default_query=query or None, api_key=self._api_key or "unset",
                              timeout=self.timeout, max_retries=0)

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "model": self.model, "voice": self.voice_for(0), "sample_rate": self.sample_rate,
                "voices": {str(k): v for k, v in sorted(self.voices.items())},
                "languages": list(self._languages) if self._languages else None, "timeout_s": self.timeout}

    def languages(self) -> tuple[str, ...] | None:
        return self._languages

    def voice_for(self, speaker: int) -> str:
        if speaker in self.voices:
            return self.voices[speaker]
        return OPENAI_VOICES[speaker] if speaker < len(OPENAI_VOICES) else self.voices.get(0, OPENAI_VOICES[0])

    def voice_name(self, request) -> str | None:
        return self.voice_for(request.speaker)

    def synthesize(self, task: SynthesisTask) -> Iterator[np.ndarray]:
        """Stream the remote's pcm as float chunks; stop (closing the request) when the task is cancelled."""
        import openai

        if self._client is None:
            raise EngineError(ErrorCode.MODEL_UNAVAILABLE, "the remote engine is not set up")
        request = task.request
        params: dict[str, Any] = {"model": self.model, "voice": self.voice_for(request.speaker),
                                  "input": " ".join(task.texts()), "response_format": "pcm"}
        if request.speed != 1.0:
            params["speed"] = request.speed
        try:
            with self._client.audio.speech.with_streaming_response.create(**params) as response:
                kind = response.headers.get("content-type", "")
                if not kind.lower().startswith(AUDIO_TYPES):  # an error page or JSON played as audio is noise
                    raise EngineError(ErrorCode.GENERATION_FAILED, f"the remote engine at {self.url} answered with "
                                                                   f"{kind or 'no content type'}, not audio")
                # OpenAI's pcm is 24 kHz; a server that says otherwise (ours at another --sample-rate) is resampled
                rate = _rate(response.headers.get("x-sample-rate"), self.sample_rate)
                resample = Resampler(rate, self.sample_rate)
                # capped as our own engines are: the request's max_audio_length_ms, else MAX_AUDIO_MS
                left = 2 * int(rate * (request.max_audio_length_ms or MAX_AUDIO_MS) / 1000)
                whole = WholeSamples()  # a sample may be split across two reads
                for data in response.iter_bytes(READ_BYTES):
                    if task.cancel.is_set():
                        return
                    data = whole(data)
                    data, left = data[:left], left - len(data)
                    if data:
                        yield resample(to_float(data))
                    if left <= 0:
                        task.truncated = True
                        log.info("The remote engine at %s sent more audio than the cap; the rest was dropped", self.url)
                        break
                yield resample(np.zeros(0, np.float32), last=True)
        except openai.RateLimitError as exc:
            self._log_said(exc)
            raise EngineError(ErrorCode.BUSY, f"the remote engine at {self.url} is busy ({status_summary(429)})") from None
        except openai.APITimeoutError:
            raise EngineError(ErrorCode.MODEL_UNAVAILABLE, f"the remote engine at {self.url} did not answer within "
                                                           f"{self.timeout:g} s") from None
        except openai.APIConnectionError as exc:
            raise EngineError(ErrorCode.MODEL_UNAVAILABLE, f"the remote engine at {self.url} cannot be reached: "
                                                           f"{scrub(str(exc.__cause__ or exc), self._url)[:300]}") from None
        except openai.APIStatusError as exc:
            code = ErrorCode.MODEL_UNAVAILABLE if exc.status_code in (401, 403) or exc.status_code >= 500 \
                else ErrorCode.GENERATION_FAILED
            self._log_said(exc)
            raise EngineError(code, f"the remote engine at {self.url} refused the request "
                                    f"({status_summary(exc.status_code)})") from None

    def _log_said(self, exc: Exception) -> None:
        """The remote's own words are for the operator's log; users get the status (they may hold anything)."""
        log.info("The remote engine at %s answered: %s", self.url, scrub(_said(exc), self._url))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _rate(header: str | None, default: int) -> int:
    return int(header) if header and header.isascii() and header.isdigit() and 8000 <= int(header) <= 192000 \
        else default


def _said(exc: Exception) -> str:
    """The remote's own error message (OpenAI's ``{"error": {"message": ...}}``), short."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:300]
    return str(exc)[:300]
