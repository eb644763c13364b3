"""The assistant's words: any OpenAI-compatible chat-completions API (Ollama, llama.cpp's server, vLLM, OpenAI).

It is reached through the official ``openai`` SDK, streaming, so the first
sentence can be spoken while the rest is being written.  Every failure becomes
an ``EngineError`` a user can act on: ``model_unavailable`` naming the address
(unreachable, refused key, an error status), ``generation_failed`` for an
answer with no text.  The address is shown without credentials or query
secrets, and an error is its status and reason phrase, never the server's body
(``addresses``).
"""

from __future__ import annotations

import logging
from typing import AsyncIterator

from .addresses import client_address, public_url, scrub, status_summary
from .errors import EngineError, ErrorCode

log = logging.getLogger(__name__)



class ChatModel:
    def __init__(self, url: str, model: str, api_key: str | None = None, system_prompt: str = "",
                 max_tokens: int = 400, timeout: float = 30) -> None:
        import openai

        self.model, self.system_prompt = model, system_prompt
        self._url = url.rstrip("/")
        self.url = public_url(self._url)  # what is shown: no credentials, no query secrets
        self.max_tokens = max_tokens
        # ``timeout`` bounds a silent stream (the SDK's read timeout); the caller bounds the time between complete
        # sentences with the same figure, whatever arrives meanwhile (``respond.answer``)
        self.timeout = timeout
        # Servers without keys (Ollama, llama.cpp) take any; the SDK insists on one.
        base, query = client_address(self._url)
        self._client = openai.AsyncOpenAI(base_url=base, default_query=query or None, api_key=api_key or "none",
                                          max_retries=0, timeout=timeout)

    def describe(self) -> dict[str, str]:
        return {"url": self.url, "model": self.model}

    async def stream(self, messages: list[dict[str, str]]) -> AsyncIterator[str]:
        """The answer to ``messages`` (after the system prompt), as text deltas in order."""
        import openai

        prompt = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        wrote = False
        try:
            stream = await self._client.chat.completions.create(model=self.model, messages=prompt + messages,
                                                                stream=True, max_tokens=self.max_tokens)
            async with stream:
                async for chunk in stream:
                    delta = _text_of(chunk)
                    if delta:
                        wrote = True
                        yield delta
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise EngineError(ErrorCode.MODEL_UNAVAILABLE, f"The chat model at {self.url} refused the key "
                                                           f"(HTTP {exc.status_code}): set TTS_CHAT_API_KEY") from None
        except openai.APIStatusError as exc:  # its body is the server's own text: logged, never forwarded
            log.info("The chat model at %s answered HTTP %s: %s", self.url, exc.status_code,
                     _short(scrub(exc.message, self._url)))
            raise EngineError(ErrorCode.MODEL_UNAVAILABLE, f"The chat model at {self.url} answered "
                                                           f"{status_summary(exc.status_code)}") from None
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            raise EngineError(ErrorCode.MODEL_UNAVAILABLE, f"The chat model at {self.url} is unreachable: "
                                                           f"{_short(scrub(str(exc.__cause__ or exc), self._url))}") from None
        except openai.OpenAIError as exc:  # a malformed stream, or an error event in it (the server's own text)
            log.info("The chat model at %s failed: %s", self.url, _short(scrub(str(exc), self._url)))
            raise EngineError(ErrorCode.MODEL_UNAVAILABLE, f"The chat model at {self.url} failed mid-answer "
                                                           f"({type(exc).__name__})") from None
        except ValueError as exc:  # a chunk that is not JSON, or not a chunk's shape
            log.info("The chat model at %s sent a malformed chunk: %s", self.url, _short(scrub(str(exc), self._url)))
            raise EngineError(ErrorCode.MODEL_UNAVAILABLE, f"The chat model at {self.url} sent a stream that is not "
                                                           "OpenAI's chat-completions format") from None
        if not wrote:
            raise EngineError(ErrorCode.GENERATION_FAILED, f"The chat model at {self.url} answered with no text")

    async def close(self) -> None:
        await self._client.close()


def _text_of(chunk) -> str | None:
    """A streamed chunk's text; None for one without text (the role, a finish, a keep-alive without choices).
    ``ValueError`` for any other shape: the SDK builds chunks without checking them, so a chat server's number,
    list or null would otherwise fail far from here, where nothing ends the answer."""
    from openai.types.chat.chat_completion_chunk import ChatCompletionChunk, Choice, ChoiceDelta

    if not isinstance(chunk, ChatCompletionChunk):
        raise ValueError(f"a chunk that is a {type(chunk).__name__}, not an object")
    choices = getattr(chunk, "choices", None) or []
    if not isinstance(choices, list) or not all(isinstance(choice, Choice) for choice in choices):
        raise ValueError("'choices' is not a list of choices")
    delta = getattr(choices[0], "delta", None) if choices else None
    if delta is not None and not isinstance(delta, ChoiceDelta):
        raise ValueError("'delta' is not an object")
    text = getattr(delta, "content", None)
    if text is not None and not isinstance(text, str):
        raise ValueError("'content' is not a string")
    return text or None


def _short(text: str) -> str:
    return text if len(text) <= 200 else text[:200] + "…"
