"""The refusals every interface shares, and the stable error codes they carry.

``Refusal`` is a request refused with one of the codes; the connection lives
on.  What a job or a conversation answers is a typed event (``core.events``):
a refusal becomes ``events.failed(refusal)``, which each interface encodes in
its own wire format.
"""

from __future__ import annotations

from ..engines.errors import ErrorCode, Refusal
from .events import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION", "ErrorCode", "Refusal", "rate_limited", "shutting_down", "too_many_queued"]


# -- refusals shared by every interface ----------------------------------------------------------

def shutting_down(request_id: str | None = None) -> Refusal:
    return Refusal(ErrorCode.SHUTTING_DOWN, "The server is shutting down; connect again shortly", request_id)


def rate_limited(per_minute: int, request_id: str | None = None, who: str = "this connection") -> Refusal:
    return Refusal(ErrorCode.RATE_LIMITED, f"More than {per_minute} requests a minute on {who}; slow down",
                   request_id)


def too_many_queued(limit: int, request_id: str | None = None, who: str = "This connection") -> Refusal:
    return Refusal(ErrorCode.TOO_MANY_QUEUED, f"{who} already has {limit} requests waiting or running; "
                                              "wait for one to finish", request_id)
