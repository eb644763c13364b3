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
positions, and all of CSM's compute runs in this one thread (one op stream: no
concurrent prefill perturbs a step's kernels).  What a row computes therefore
never depends on who else is running, so a seeded request gets the same tokens
alone or beside others (float32 on CPU; the README states what is and is not
guaranteed).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.nn import functional as F
from transformers import DynamicCache


from .csm_decode import CsmDecoder, Sampling, _attend, _Layer, _mlp, _rms_norm, _rotary, skinny_linear

log = logging.getLogger(__name__)
_DONE = None  # row queue sentinel


class RowCache:
    """Preallocated backbone KV cache: ``rows`` sequences of up to ``length`` positions each.

    It stands in for a transformers ``Cache`` in the decoder layers (they only
    call ``update``): each row's new key/value goes to that row's own position.
    """

    def __init__(self, config, rows: int, length: int, dtype: torch.dtype, device) -> None:
        shape = (rows, config.num_key_value_heads, length, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.write_at = torch.zeros(rows, dtype=torch.long, device=device)
        self._rows = torch.arange(rows, device=device)

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        self.keys[layer_idx][self._rows, :, self.write_at] = key_states[:, :, 0]
        self.values[layer_idx][self._rows, :, self.write_at] = value_states[:, :, 0]
        return self.keys[layer_idx], self.values[layer_idx]

    def load(self, slot: int, prefill: DynamicCache) -> None:
        """Copy one prefilled sequence (batch 1) into ``slot``."""
        for index, layer in enumerate(prefill.layers):
            length = layer.keys.shape[2]
            self.keys[index][slot, :, :length] = layer.keys[0]
            self.values[index][slot, :, :length] = layer.values[0]


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
        self.steps = 0
        self._layers = [_Layer.of(layer) for layer in decoder.model.backbone_model.layers]
        self.linear = skinny_linear if decoder.device.type == "cpu" else F.linear

    def frames(self, embeds: torch.Tensor, sampling: Sampling, max_frames: int, rng: torch.Generator | None,
               cancel: threading.Event) -> Iterator[torch.Tensor]:
        """Like ``CsmDecoder.frames``: this request's frames, computed by the batch thread."""
        if max_frames < 1 or embeds.shape[0] + max_frames > self.length:
            raise ValueError("prompt plus frame budget exceed CSM's positions")
        row = Row(sampling, rng, cancel, max_frames, embeds.shape[0], embeds=embeds)
        self._join(row)
        try:
            while (frame := row.out.get()) is not _DONE:
                if isinstance(frame, Exception):
                    raise frame
                yield frame
        finally:
            row.stopped.set()  # if the consumer stopped early, the row leaves at the next boundary

    def _join(self, row: Row) -> None:
        with self._wake:
            if not self._free:
                raise RuntimeError("more concurrent CSM requests than batch rows")
            row.slot = self._free.pop(0)
            self._joining.append(row)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="csm-batch", daemon=True)
                self._thread.start()
            self._wake.notify()

    @torch.inference_mode()
    def _run(self) -> None:
        """The batch thread: all of CSM's compute for batched requests happens here, one op stream."""
        while True:
            with self._wake:
                while not self._joining and not self.active:
                    self._wake.wait()
                joining, self._joining = self._joining, []
            for row in joining:
                try:
                    self._admit(row)
                except Exception as exc:
                    log.exception("CSM prefill failed")
                    row.out.put(RuntimeError(f"CSM prefill failed: {exc}"))
                    with self._wake:
                        self._free.append(row.slot)
            with self._wake:
                for row in list(self.active.values()):
                    if row.cancel.is_set() or row.stopped.is_set():
                        self._leave(row)
            if self.active:
                try:
                    self._step()
                except Exception as exc:  # a failed step ends its rows with an error, not the thread
                    log.exception("CSM batch step failed")
                    with self._wake:
                        for row in list(self.active.values()):
                            row.out.put(RuntimeError(f"CSM batch step failed: {exc}"))
                            self._leave(row, notify=False)

    def _admit(self, row: Row) -> None:
        """Prefill a new row on its own and give it a batch slot; its first frame comes with the next step."""
        decoder = self.decoder
        if self.cache is None:
            weights = decoder.model.lm_head.weight
            # one position more than CSM's: the scratch place where idle rows' keys and values go
            self.cache = RowCache(decoder.config, self.rows, self.length + 1, weights.dtype, weights.device)
        row.hidden, prefilled = decoder.prefill(row.embeds)
        row.embeds = None
        with self._wake:
            if row.cancel.is_set() or row.stopped.is_set():
                self._leave(row)
                return
            self.cache.load(row.slot, prefilled)
            self.active[row.slot] = row

    def _leave(self, row: Row, notify: bool = True) -> None:
        """Free the row's slot (caller holds the lock); its consumer sees the end of its frames."""
        self.active.pop(row.slot, None)
        self._free.append(row.slot)
        if notify:
            row.out.put(_DONE)

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

        def pick(logits: torch.Tensor) -> torch.Tensor:
            ids = torch.zeros(self.rows, dtype=torch.long, device=device)
            for slot, row in rows.items():
                ids[slot] = decoder._pick(logits[slot:slot + 1], row.sampling, row.rng)[0]
            return ids

        frames = decoder.sample_frame(hidden, pick, self.linear)
        self.steps += 1
        with self._wake:
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
        decoder, cache = self.decoder, self.cache
        backbone = decoder.model.backbone_model
        device = cache.write_at.device
        last = torch.zeros(self.rows, decoder.num_codebooks, dtype=torch.long, device=device)
        positions = torch.full((self.rows,), self.length, dtype=torch.long, device=device)  # scratch position
        for slot, row in stepping.items():
            last[slot] = row.last_frame
            positions[slot] = row.position
        cache.write_at = positions
        x = backbone.embed_tokens(last[:, None, :])
        cos, sin = (t.unsqueeze(1) for t in backbone.rotary_emb(x, position_ids=positions[:, None]))
        lengths = {slot: row.position + 1 for slot, row in stepping.items()}
        for index, layer in enumerate(self._layers):
            x = _cached_layer_step(layer, x, cos, sin, cache, index, lengths, self.linear)
        return _rms_norm(x[:, -1], backbone.norm.weight, backbone.norm.variance_epsilon)


def _cached_layer_step(layer: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: RowCache,
                       index: int, lengths: dict[int, int], linear) -> torch.Tensor:
    """One backbone layer for one new position per row (``x``: ``(rows, 1, hidden)``), writing into ``cache``.

    ``CsmDecoderLayer.forward``'s operations, except that each row attends on
    its own over its ``lengths[slot]`` cached positions (no mask, no repeated
    key/value heads: SDPA's grouped-query path); rows not in ``lengths`` are idle.
    """
    h = _rms_norm(x, layer.norm1, layer.eps)
    shape = (x.shape[0], 1, -1, layer.head_dim)
    q = linear(h, layer.q).view(shape).transpose(1, 2)
    k = linear(h, layer.k).view(shape).transpose(1, 2)
    v = linear(h, layer.v).view(shape).transpose(1, 2)
    q, k = _rotary(q, cos, sin), _rotary(k, cos, sin)
    keys, values = cache.update(k, v, index)
    out = torch.zeros_like(q.transpose(1, 2))  # (rows, 1, heads, head_dim), as SDPA returns it
    for slot, length in lengths.items():
        out[slot:slot + 1] = _attend(layer, q[slot:slot + 1], keys[slot:slot + 1, :, :length],
                                     values[slot:slot + 1, :, :length])
    x = x + linear(out.reshape(x.shape[0], 1, -1), layer.o)
    return _mlp(layer, x, linear)
