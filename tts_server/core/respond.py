"""The assistant's turn: an LLM writes the answer to a session's transcript and CSM speaks it as it is written.

``answer`` runs on the event loop beside the job it speaks through.  The LLM's
deltas go out at once as ``reply_text`` (through the job's outbox, so they keep
their place among the connection's replies); complete sentences go into the
job's ``SentenceFeed``.  The job is queued when the first sentence is complete,
not before: the engine's worker is not held while the LLM thinks.  Cancelling
the job (a ``cancel``, barge-in, the connection closing) closes the LLM's stream
at once, and a model that finishes no sentence for the chat timeout is stopped,
whatever it sends meanwhile.  The prompt is the transcript (``chat_messages``):
whole turns, up to ``PROMPT_CHARS`` characters, the oldest dropped first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator, Callable, Sequence

from ..engines.base import ContextTurn, EngineError
from ..engines.chat import ChatModel
from ..engines.errors import ErrorCode, Refusal
from .events import ReplyText
from .jobs import Job
from .sessions import StoredTurn
from .streamed_text import StreamedText

log = logging.getLogger(__name__)
PROMPT_CHARS = 12_000  # the most transcript the chat model is sent (the system prompt apart): ~3,000 tokens
WATCH_S = 0.1  # how often a wait for the chat model looks at the job's cancel flag (a thread's event, not awaitable)


def chat_messages(transcript: Sequence[ContextTurn | StoredTurn], assistant: int,
                  budget: int = PROMPT_CHARS) -> list[dict[str, str]]:
    """The transcript as chat messages: the assistant's speaker is ``assistant``, every other speaker the user;
    consecutive turns of one side are joined (chat APIs expect the roles to alternate; an answer is stored as a
    turn per sentence).  Whole turns, the newest that fit in ``budget`` characters, the oldest dropped first (the
    newest alone longer than that is cut to its end)."""
    kept: list[tuple[str, str]] = []
    left = budget
    for turn in reversed(transcript):
        text = turn.text.strip()
        if getattr(turn, "pinned", False) or not text:
            continue
        role = "assistant" if turn.speaker == assistant else "user"
        if len(text) + 1 > left:
            if not kept:
                kept.append((role, text[-budget:]))
            break
        left -= len(text) + 1  # and the space that joins it to a neighbour
        kept.append((role, text))
    messages: list[dict[str, str]] = []
    for role, text in reversed(kept):
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += " " + text
        else:
            messages.append({"role": role, "content": text})
    return messages


async def answer(job: Job, chat: ChatModel, messages: list[dict[str, str]], submit: Callable[[Job], None],
                 max_chars: int = 4000, begun: AsyncIterator[str] | None = None) -> None:
    """Stream the LLM's answer into ``job`` (a ``StreamedText``, as a client's text stream); ``submit`` queues the
    job.  An answer longer than ``max_chars`` (a request's text limit) is cut there: the stream is closed, the reply
    ``truncated``.  A model that writes no complete sentence for ``chat.timeout`` seconds, whatever it sends
    meanwhile, is stopped (``model_unavailable``): a trickle or keep-alives must not hold the engine's worker, which
    waits for the next sentence.  ``begun``: the chat model's stream already begun (``preempt.Preemptive``); else
    one is opened.  Speech starts at the first phrase (a clause of a few words), then goes sentence by sentence."""
    text = StreamedText(job, submit, max_chars, chat.timeout, first_phrase=True)
    source = chat.stream(messages) if begun is None else begun
    try:
        async with contextlib.aclosing(source) as deltas:  # leaving closes the LLM's stream
            while (delta := await _next_delta(deltas, job, text.deadline, chat)) is not None:
                if len(delta) >= text.room:
                    delta, job.task.truncated = delta[:text.room], True
                job.post(ReplyText(job.request_id, delta))
                text.add(delta)
                if job.task.truncated:
                    break
        text.end(Refusal(ErrorCode.MODEL_UNAVAILABLE, f"The chat model at {chat.url} wrote nothing to speak"))
    except EngineError as exc:
        text.fail(Refusal(exc.code, exc.message))
    except Exception:  # a bug costs this answer, never its terminal reply (the connection's writer waits for it)
        log.exception("The answer %s failed", job.request_id)
        text.fail(Refusal(ErrorCode.INTERNAL_ERROR, "Internal server error"))
    finally:
        text.close()  # however it ended, the engine is not left waiting


async def _next_delta(deltas: AsyncIterator[str], job: Job, deadline: float, chat: ChatModel) -> str | None:
    """The chat stream's next delta; None at its end, or at once when the job is cancelled or ends (a ``cancel``,
    barge-in, the connection closing, the watchdog).  However much arrives meanwhile without text (empty deltas,
    reasoning tokens, keep-alives: ``ChatModel.stream`` yields none of them), the wait ends at ``deadline``, the
    last complete sentence plus the chat timeout: ``model_unavailable``.  A wait given up cancels the read, which
    closes the HTTP stream: the chat server sees the hang-up then, not at its next chunk."""
    step = asyncio.ensure_future(anext(deltas, None))
    try:
        while not step.done():
            if job.cancel_event.is_set() or job.finished:
                return None
            left = deadline - time.monotonic()
            if left <= 0:  # a trickle, or text-less chunks: never a sentence
                raise EngineError("model_unavailable", f"The chat model at {chat.url} wrote no complete sentence "
                                                       f"for {chat.timeout:g} s; the answer was stopped")
            await asyncio.wait({step}, timeout=min(left, WATCH_S))
        return step.result()
    finally:
        if not step.done():
            step.cancel()
            await asyncio.gather(step, return_exceptions=True)  # the stream is closed before the caller goes on
