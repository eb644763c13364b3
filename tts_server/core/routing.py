"""The engine chain: which engine answers a request, and which one takes over when it fails.

The operator lists engines in order (``--engines csm,remote,piper``).  A request
that names no engine goes to the first engine of the chain that speaks its
``language`` and has not failed to load; it *waits* for that engine while it
loads (so a conversation never changes voice because of a slow start).  An
engine that fails a request before any audio was sent hands it to the next
ready engine that speaks the language (``next_after``).  A request that names an
engine gets that engine or an error, never another.  The optional overflow
engine takes requests that named none when the queue is full (the scheduler
decides when; ``overflow_slot`` says whether it can).
"""

from __future__ import annotations

from . import replies as r
from ..engines.request import SynthesisRequest
from .jobs import EngineSlot, EngineState
from ..audio.languages import speaks


class Chain:
    """The engine slots in routing order, by name, and the routing rules over them."""

    def __init__(self, slots: list[EngineSlot], overflow: str | None = None) -> None:
        if not slots:
            raise ValueError("an engine chain needs at least one engine")
        self.slots = list(slots)
        self.by_name = {slot.name: slot for slot in self.slots}
        if overflow is not None and overflow not in self.by_name:
            raise ValueError(f"overflow engine {overflow!r} is not in the chain")
        self.overflow = self.by_name.get(overflow) if overflow else None

    @property
    def primary(self) -> EngineSlot:
        return self.slots[0]

    def languages(self) -> list[str] | None:
        """Every language some engine speaks, sorted; ``None`` when an engine speaks any (it does not say)."""
        found: set[str] = set()
        for slot in self.slots:
            codes = slot.engine.languages()
            if codes is None:
                return None
            found.update(codes)
        return sorted(found)

    def _pool(self, request: SynthesisRequest) -> list[EngineSlot]:
        """The engines ``request`` may go to: its named engine alone, if it names one, else the whole chain."""
        return [self.by_name[request.engine]] if request.engine in self.by_name else self.slots

    def candidates(self, request: SynthesisRequest) -> list[EngineSlot]:
        """The engines of ``_pool`` that speak ``request``'s language, in chain order."""
        return [slot for slot in self._pool(request) if _speaks(slot, request)]

    def first_choice(self, request: SynthesisRequest) -> EngineSlot | None:
        """The engine that answers ``request`` when every engine is up (so any other one is a fallback)."""
        found = self.candidates(request)
        return found[0] if found else None

    def route(self, request: SynthesisRequest, overflow: bool = False) -> EngineSlot:
        """The slot that should serve ``request`` now (possibly still loading); the ``Refusal`` to answer when none
        can."""
        if request.engine is not None and request.engine not in self.by_name:
            raise r.Refusal(r.ErrorCode.MODEL_UNAVAILABLE, f"Engine {request.engine!r} is unavailable: not "
                                                           "configured on this server", request.request_id)
        found = self.candidates(request)
        if not found:
            raise self._unsupported(request)
        if overflow and self.overflow in found and self.overflow.state != EngineState.FAILED:
            return self.overflow
        for slot in found:
            if slot.state != EngineState.FAILED:
                return slot
        if request.engine is not None:
            raise r.Refusal(r.ErrorCode.MODEL_UNAVAILABLE,
                            f"Engine {request.engine!r} is unavailable: {found[0].reason}", request.request_id)
        if len(found) == 1:
            raise r.Refusal(r.ErrorCode.MODEL_UNAVAILABLE, f"Model unavailable: {found[0].reason}",
                            request.request_id)
        reasons = "; ".join(f"{slot.name}: {slot.reason}" for slot in found)
        raise r.Refusal(r.ErrorCode.MODEL_UNAVAILABLE, f"No engine can serve: {reasons}", request.request_id)

    def next_after(self, slot: EngineSlot, request: SynthesisRequest) -> EngineSlot | None:
        """The ready engine after ``slot`` that may take over ``request`` (one that named no engine)."""
        if request.engine is not None or slot not in self.slots:
            return None
        later = self.slots[self.slots.index(slot) + 1:]
        return next((s for s in later if s.state == EngineState.READY and _speaks(s, request)), None)

    def overflow_slot(self, request: SynthesisRequest) -> EngineSlot | None:
        """The overflow engine, when it is ready and may take ``request`` instead of a ``busy``."""
        slot = self.overflow
        if slot is None or request.engine is not None or slot.state != EngineState.READY:
            return None
        return slot if _speaks(slot, request) else None

    def _unsupported(self, request: SynthesisRequest) -> r.Refusal:
        spoken = sorted({code for slot in self._pool(request) for code in (slot.engine.languages() or ())})
        where = f"engine {request.engine!r}" if request.engine else "this server"
        return r.Refusal(r.ErrorCode.UNSUPPORTED_LANGUAGE,
                         f"No engine speaks {request.language!r}; {where} speaks: {', '.join(spoken)}",
                         request.request_id)


def _speaks(slot: EngineSlot, request: SynthesisRequest) -> bool:
    return speaks(slot.engine.languages(), request.language)
