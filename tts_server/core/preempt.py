"""An answer begun before the turn it answers is confirmed (preemptive generation, as LiveKit Agents does).

When the listener proposes the end of an utterance and its transcript is
ready, the chat model is asked at once, on the transcript so far; its deltas are
kept here, unseen.  If the turn is then confirmed with the same transcript, the
answer replays what was kept and goes on live (``stream``): nothing is lost and
the chat model's time to first token is already behind.  If the speaker goes
on, or the transcript differs, ``cancel`` closes the chat stream: nothing of it
was spoken, stored or sent to the client, and the chat server sees the hang-up.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from ..engines.chat import ChatModel


class Preemptive:
    def __init__(self, chat: ChatModel, messages: list[dict[str, str]], max_chars: int = 4000) -> None:
        """``max_chars``: the most an answer may say (a request's text limit); past it nothing more is read or
        kept (the answer that adopts it is cut there, ``truncated``)."""
        self.messages, self.max_chars = messages, max_chars
        self._deltas: list[str] = []
        self._chars = 0
        self._more = asyncio.Event()
        self._done = False
        self._error: BaseException | None = None
        self._task = asyncio.create_task(self._read(chat), name="preemptive-answer")

    async def _read(self, chat: ChatModel) -> None:
        try:
            async with contextlib.aclosing(chat.stream(self.messages)) as deltas:  # leaving closes the stream
                async for delta in deltas:
                    self._deltas.append(delta)
                    self._chars += len(delta)
                    self._more.set()
                    if self._chars > self.max_chars:
                        break
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # told to the answer that adopts it, as its own stream would have
            self._error = exc
        finally:
            self._done = True
            self._more.set()

    async def stream(self) -> AsyncIterator[str]:
        """What the chat model wrote so far, then the rest as it comes; closing it early closes the chat stream."""
        sent = 0
        try:
            while True:
                while sent < len(self._deltas):
                    sent += 1
                    yield self._deltas[sent - 1]
                if self._done:
                    if self._error is not None:
                        raise self._error
                    return
                self._more.clear()
                if sent == len(self._deltas) and not self._done:
                    await self._more.wait()
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stop the chat stream now (the answer is not wanted, or was stopped)."""
        if not self._task.done():
            self._task.cancel()

    @property
    def cancelled(self) -> bool:
        return self._task.cancelled()
