"""The one small interface every speech engine implements.

An engine knows nothing about sockets or the queue: it loads its model
(blocking, in a loader thread), describes itself, and turns one validated
request into float32 mono audio chunks at its native ``sample_rate``.  It runs
in the scheduler's worker thread and checks ``cancel`` between chunks (CSM:
between frames) so that a cancelled request stops within one step's compute.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any, Iterator

import numpy as np

from ..protocol import SynthesisRequest


class EngineError(Exception):
    """A request-level failure with a protocol error code (``generation_failed``, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Engine(ABC):
    """Base class: ``load`` once, then ``synthesize`` many times from one worker thread."""

    name: str = "engine"
    sample_rate: int = 24000

    @abstractmethod
    def load(self) -> None:
        """Load weights; raise with a human sentence as the message when it cannot."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Static facts for ``/v1/info`` and logs (voice, device, dtype, ...)."""

    @abstractmethod
    def synthesize(self, request: SynthesisRequest, cancel: threading.Event) -> Iterator[np.ndarray]:
        """Yield audio chunks (float32, mono, ``sample_rate``) for ``request``."""

    def close(self) -> None:
        """Release what ``load`` took; the default has nothing to release."""
