"""Continuous batching for CSM: every active request advances one frame per shared model step.

On a memory-bound machine one step costs about the same for 1 row as for 8
(the weights are read once), so serving streams one after another wastes most
of it.  Here each request ("row"):

1. is prefilled on its own (batch 1) between two batch steps, and its KV cache
   copied into a free slot of a preallocated cache (``RowCache``);
2. joins the batch at that frame boundary: the next step samples its first
   frame from the prompt's last hidden state, beside the others' next frames;
3. then gets one frame per batch step, sampled with its own settings and RNG,
   until its frame budget, its end-of-audio frame, or its cancellation, when it
   leaves the batch at once.

Every matrix product runs on the full ``rows`` shape (idle slots compute on
zeros and are ignored), attention runs row by row over that row's own
positions, and all of CSM's model steps (prefill, backbone, depth decoder) run in
this one thread (one op stream: no concurrent prefill perturbs a step's kernels;
Mimi decodes each request's audio in that request's own thread).  What a row computes therefore
never depends on who else is running, so a seeded request gets the same tokens
alone or beside others (float32 on CPU; the README states what is and is not
guaranteed).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.nn import functional as F

from .csm_decode import CsmDecoder, RowCache, Sampling, skinny_linear

log = logging.getLogger(__name__)
_DONE = None  # row queue sentinel


@dataclass(eq=False)
class Row:
    sampling: Sampling
    rng: torch.Generator | None
    cancel: threading.Event
    frames_left: int
    position: int  # where this row's next token goes
    embeds: torch.Tensor | None = None  # the prompt, until the batch thread prefills it
    last_frame: torch.Tensor | None = None  # (num_codebooks,)
    out: queue.Queue = field(default_factory=queue.Queue)
    stopped: threading.Event = field(default_factory=threading.Event)  # the consumer went away
    hidden: torch.Tensor | None = None  # the prompt's last hidden state, until the row's first frame
    slot: int = -1


class Batcher:
    """Owns the batch thread; ``frames`` is called from each request's thread."""

    def __init__(self, decoder: CsmDecoder, rows: int) -> None:
        self.decoder = decoder
        self.rows = rows
        self.length = int(decoder.config.max_position_embeddings)
        self.cache: RowCache | None = None
        self.active: dict[int, Row] = {}
        self._free = list(range(rows))
        self._joining: list[Row] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._busy_since: float | None = None  # monotonic start of the current prefill or step
        self.abandoned = False
        self.steps = 0
        self.linear = decoder.linear_for(skinny_linear if decoder.device.type == "cpu" else F.linear)

    def frames(self, embeds: torch.Tensor, sampling: Sampling, max_frames: int, rng: torch.Generator | None,
               cancel: threading.Event) -> Iterator[torch.Tensor]:
        """Like ``CsmDecoder.frames``: this request's frames, computed by the batch thread."""
        if max_frames < 1 or embeds.shape[0] + max_frames > self.length:
            raise ValueError("prompt plus frame budget exceed CSM's positions")
        row = Row(sampling, rng, cancel, max_frames, embeds.shape[0], embeds=embeds)
        if not self._join(row):
            return  # cancelled while waiting for a row
        try:
            while (frame := row.out.get()) is not _DONE:
                if isinstance(frame, BaseException):
                    raise frame
                yield frame
        finally:
            row.stopped.set()  # if the consumer stopped early, the row leaves at the next boundary

    def _join(self, row: Row) -> bool:
        """Queue ``row`` for the batch thread; ``False`` if it was cancelled before a row was free.

        The scheduler admits at most ``rows`` requests, but a request it has let
        go (cancelled, disconnected, retried elsewhere) frees its row only at the
        end of the batch thread's current step: a newcomer waits for that moment.
        """
        with self._wake:
            while not self._free:
                if row.cancel.is_set():
                    return False
                if self.abandoned:
                    raise RuntimeError("the CSM batch thread was abandoned")
                self._wake.wait(0.05)
            row.slot = self._free.pop(0)
            self._joining.append(row)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="csm-batch", daemon=True)
                self._thread.start()
            self._wake.notify_all()
        return True

    def stalled_for(self) -> float:
        """Seconds the batch thread has been inside one prefill or step (0 when it is waiting for work)."""
        busy = self._busy_since
        return 0.0 if busy is None else time.monotonic() - busy

    def abandon(self, why: str) -> None:
        """Give up on a stuck batch thread: its requests end with an error, and it exits if it ever returns."""
        with self._wake:
            self.abandoned = True
            for row in [*self.active.values(), *self._joining]:
                row.out.put(RuntimeError(why))
            self.active.clear()
            self._joining.clear()
            self._wake.notify_all()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the batch thread to return (after ``abandon``); whether it has.  A process
        must not exit while this daemon thread is inside a torch step: the runtime aborts (SIGABRT)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    @torch.inference_mode()
    def _run(self) -> None:
        """The batch thread: all of CSM's model steps for batched requests happen here, one op stream."""
        while True:
            with self._wake:
                while not self._joining and not self.active and not self.abandoned:
                    self._wake.wait()
                if self.abandoned:
                    return
                joining, self._joining = self._joining, []
                self._busy_since = time.monotonic()
            for row in joining:
                try:
                    self._admit(row)
                except Exception as exc:
                    log.exception("CSM prefill failed")
                    with self._wake:
                        self._fail(row, exc, "CSM prefill failed")
            with self._wake:
                for row in list(self.active.values()):
                    if row.cancel.is_set() or row.stopped.is_set():
                        self._leave(row)
            if self.active:
                try:
                    self._step()
                except Exception as exc:  # a failed step (out of memory, ...) ends its rows, not the thread
                    log.exception("CSM batch step failed")
                    with self._wake:
                        for row in list(self.active.values()):
                            self._fail(row, exc, "CSM batch step failed")
            with self._wake:
                self._busy_since = None

    def _admit(self, row: Row) -> None:
        """Prefill a new row on its own and give it a batch slot; its first frame comes with the next step."""
        decoder = self.decoder
        if self.cache is None:
            # one position more than CSM's: the scratch place where idle rows' keys and values go
            self.cache = RowCache(decoder.config, self.rows, self.length + 1, decoder.dtype, decoder.device)
        row.hidden, prefilled = decoder.prefill(row.embeds)
        row.embeds = None
        with self._wake:
            if row.cancel.is_set() or row.stopped.is_set():
                self._leave(row)
                return
            self.cache.load(row.slot, prefilled)
            self.active[row.slot] = row

    def _leave(self, row: Row, ending: object = _DONE) -> None:
        """Free the row's slot (caller holds the lock); its consumer gets ``ending`` (the end, or an error)."""
        if self.abandoned:  # the rows and slots belong to no one any more
            return
        self.active.pop(row.slot, None)
        self._free.append(row.slot)
        row.out.put(ending)
        self._wake.notify_all()  # a request waiting for a free row

    def _fail(self, row: Row, exc: BaseException, what: str) -> None:
        """End ``row`` with an error of its own; out of memory stays out of memory (the scheduler frees caches)."""
        oom = getattr(torch, "OutOfMemoryError", MemoryError)
        error = oom(f"{what}: {exc}") if isinstance(exc, oom) else RuntimeError(f"{what}: {exc}")
        self._leave(row, error)

    def _step(self) -> None:
        """One frame for every active row: a backbone step for rows past their first frame, then the depth decoder.

        Every matrix product runs on the full ``rows`` shape (idle slots are
        zeros) with ``skinny_linear`` on CPU; attention runs row by row over
        that row's own positions.  Nothing a row computes depends on its
        neighbours, so its tokens do not either.
        """
        decoder, cache = self.decoder, self.cache
        rows = dict(self.active)
        device = cache.write_at.device
        hidden = torch.zeros(self.rows, decoder.config.hidden_size, dtype=cache.keys[0].dtype, device=device)
        stepping = {slot: row for slot, row in rows.items() if row.hidden is None}
        if stepping:
            hidden = self._backbone_step(stepping)
        for slot, row in rows.items():
            if row.hidden is not None:  # just prefilled: its first frame comes from the prompt's last state
                hidden[slot], row.hidden = row.hidden[0], None

        failed: dict[int, Exception] = {}

        def pick(logits: torch.Tensor) -> torch.Tensor:
            ids = torch.zeros(self.rows, dtype=torch.long, device=device)
            for slot, row in rows.items():
                if slot in failed:
                    continue
                try:  # one row's sampling failure is that row's alone: its neighbours go on
                    ids[slot] = decoder._pick(logits[slot:slot + 1], row.sampling, row.rng)[0]
                except Exception as exc:
                    log.exception("CSM sampling failed for one batch row")
                    failed[slot] = exc
            return ids

        frames = decoder.sample_frame(hidden, pick, self.linear)
        self.steps += 1
        with self._wake:
            for slot, exc in failed.items():
                self._fail(rows.pop(slot), exc, "CSM sampling failed")
            for slot, row in rows.items():
                frame = frames[slot]
                if slot in stepping:
                    row.position += 1
                row.frames_left -= 1
                if decoder.is_end(frame) or row.cancel.is_set() or row.stopped.is_set():
                    self._leave(row)
                    continue
                row.last_frame = frame
                row.out.put(frame)
                if row.frames_left <= 0:
                    self._leave(row)

    def _backbone_step(self, stepping: dict[int, Row]) -> torch.Tensor:
        """The backbone on each stepping row's last frame: last hidden states ``(rows, hidden)``."""
        decoder = self.decoder
        device = self.cache.write_at.device
        last = torch.zeros(self.rows, decoder.num_codebooks, dtype=torch.long, device=device)
        positions = torch.full((self.rows,), self.length, dtype=torch.long, device=device)  # scratch position
        for slot, row in stepping.items():
            last[slot] = row.last_frame
            positions[slot] = row.position
        lengths = {slot: row.position + 1 for slot, row in stepping.items()}
        return decoder.backbone_step(last, positions, lengths, self.cache, self.linear)
