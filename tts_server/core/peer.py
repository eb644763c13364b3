"""What a conversation needs of the interface that holds it: a ``Peer``.

A ``Conversation`` (``core.conversation``) never sees a socket or a wire format.
It speaks typed events (``core.events``) and hands its jobs over through this
small interface, so the WebSocket's ``Connection`` holds one today and any other
interface could tomorrow: the interface encodes the events, keeps its jobs'
replies in order, and knows whether its client is still there.
"""

from __future__ import annotations

from typing import Hashable, Protocol

from .events import Frame
from .jobs import Job


class Peer(Protocol):
    #: the client as the server admitted it: its turn on the shared model threads (``fair.FairThread``)
    key: Hashable

    async def send(self, *frames: Frame) -> None:
        """Send replies now, back to back, ahead of any job's replies still in line (refusals, notices, a turn
        saved)."""

    def enqueue(self, job: Job) -> None:
        """Put ``job`` in line on the ordered writer, so its replies keep their place among the client's; raises
        ``Refusal`` when the interface's own limits refuse it (draining, a request id in use, too many queued)."""

    def schedule(self, job: Job) -> None:
        """Hand an enqueued job whose text is ready to the scheduler (``Busy`` when its queue is full); a loading
        notice the client has not had yet goes out among the job's replies."""

    def gone(self) -> bool:
        """Whether the client has disconnected although frames it sent are still being handled: none of them is
        worth a model's time."""
