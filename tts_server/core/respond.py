"""The assistant's turn: an LLM writes the answer to a session's transcript and CSM speaks it as it is written.

``answer`` runs on the event loop beside the job it speaks through.  The LLM's
deltas go out at once as ``reply_text`` (through the job's outbox, so they keep
their place among the connection's replies); complete sentences go into the
job's ``SentenceFeed``.  The job is queued when the first sentence is complete,
not before: the engine's worker is not held while the LLM thinks.  Cancelling
the job (a ``cancel``, barge-in, the connection closing) stops the LLM stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable

from ..audio.text import SentenceStream
from ..engines.base import ContextTurn, EngineError, SentenceFeed
from ..engines.chat import ChatModel
from . import replies as r
from .jobs import Job



def chat_messages(history: list[ContextTurn], assistant: int) -> list[dict[str, str]]:
    """The transcript as chat messages: the assistant's speaker is ``assistant``, every other speaker the user;
    consecutive turns of one side are joined (chat APIs expect the roles to alternate)."""
    messages: list[dict[str, str]] = []
    for turn in history:
        if turn.pinned or not turn.text.strip():
            continue
        role = "assistant" if turn.speaker == assistant else "user"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += " " + turn.text.strip()
        else:
            messages.append({"role": role, "content": turn.text.strip()})
    return messages


async def answer(job: Job, chat: ChatModel, messages: list[dict[str, str]], submit: Callable[[Job], None],
                 max_chars: int = 4000) -> None:
    """Stream the LLM's answer into ``job``; ``submit`` queues the job (it may raise ``ProtocolError``).  An answer
    longer than ``max_chars`` (a request's text limit) is cut there: the stream is closed, the reply ``truncated``.
    A model that writes no complete sentence for ``chat.timeout`` seconds is stopped (``model_unavailable``): a
    trickle must not hold the engine's worker, which waits for the next sentence."""
    feed = job.task.feed = SentenceFeed()
    sentences = SentenceStream()
    written: list[str] = []
    queued = False
    last_sentence = time.monotonic()

    def speak(parts: list[str]) -> None:
        nonlocal queued, last_sentence
        if parts:
            last_sentence = time.monotonic()
        for sentence in parts:
            feed.put(sentence)
        if parts and not queued:
            queued = True
            job.request = job.task.request = dataclasses.replace(job.request, text=parts[0])
            submit(job)

    try:
        async with contextlib.aclosing(chat.stream(messages)) as deltas:  # leaving closes the LLM's stream
            async for delta in deltas:
                if job.cancel_event.is_set() or job.finished:
                    return
                room = max_chars - sum(map(len, written))
                if len(delta) >= room:
                    delta, job.task.truncated = delta[:room], True
                written.append(delta)
                job.progress_at = time.monotonic()  # the LLM writing is progress: the watchdog waits for it
                job.post({"status": "reply_text", "request_id": job.request_id, "delta": delta})
                speak(sentences.add(delta))
                if job.task.truncated:
                    break
                if time.monotonic() - last_sentence > chat.timeout:  # a trickle: characters, never a sentence
                    raise EngineError("model_unavailable", f"The chat model at {chat.url} wrote no complete "
                                                           f"sentence for {chat.timeout:g} s; the answer was stopped")
        speak(sentences.finish())
        job.request = dataclasses.replace(job.request, text="".join(written).strip() or job.request.text)
    except EngineError as exc:
        feed.close(exc)
        if not queued:
            job.finish(r.error_reply(r.ErrorCode(exc.code), exc.message, job.request_id))
    except r.ProtocolError as exc:  # the queue refused it
        feed.close(EngineError(exc.code.value, exc.message))
        job.finish(exc.reply())
    finally:
        feed.close()  # however it ended, the engine is not left waiting (after an error, it reads that first)
        if job.cancel_event.is_set() and not job.started:
            job.finish(r.cancelled_reply(job.request_id))
