"""CSM's decode loop, owned by the server instead of ``model.generate``.

One audio frame is one backbone step (which samples codebook 0) followed by
``num_codebooks - 1`` depth-decoder steps (one per further codebook).
transformers runs this as ``generate`` nested inside ``generate``; we call the
same modules directly so that we can yield frame by frame (streaming), stop the
moment a request is cancelled, sample with a per-request RNG, and keep ids the
codec cannot decode out of the sample space.

With the same weights, inputs and settings the tokens equal those of
``model.generate(..., suppress_tokens=<ids >= codec size>)`` (greedy exactly;
sampled too when the global RNG and our generator start from the same seed):
``tests/test_csm_exactness.py`` proves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.nn import functional as F
from transformers import DynamicCache

from .quantize import dispatching


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling settings, applied to every codebook.

    ``top_k=1`` is greedy decoding (the argmax), which is what the protocol
    offers instead of a separate ``do_sample`` switch.
    """

    temperature: float = 0.9
    top_k: int = 50


class CsmDecoder:
    """Turns a prompt into audio-code frames, one ``(num_codebooks,)`` tensor per step."""

    def __init__(self, model, compile: bool = False) -> None:
        """``compile``: run the depth-decoder layer step through ``torch.compile`` (dynamic shapes).

        Meant for CUDA, where it fuses the step's many small kernels; on this
        project's CPUs it compiles in ~30 s and is no faster, so it is off by default.
        """
        self.model = model
        self._layer_step = torch.compile(_layer_step, dynamic=True) if compile else _layer_step
        self.config = model.config
        self.num_codebooks = model.config.num_codebooks
        # CSM-1B's codebook vocabulary (2051) is larger than the codec's (2048):
        # the extra ids are special and must never be sampled or decoded.
        self.codec_size = model.config.codec_config.codebook_size
        embeddings = model.backbone_model.embed_tokens.embed_audio_tokens.weight
        self.device, self.dtype = embeddings.device, embeddings.dtype  # of activations (int8 weights have neither)
        depth = model.depth_decoder
        self._depth_layers = [_Layer.of(layer) for layer in depth.model.layers]
        self._backbone_layers = [_Layer.of(layer) for layer in model.backbone_model.layers]
        self._depth_projector = depth.model.inputs_embeds_projector.weight
        int8_heads = getattr(model, "int8_depth_heads", None)  # set by quantize.quantize_model
        self.quantized = int8_heads is not None
        # head i: (hidden, vocab) -> linear weight
        self._depth_heads = int8_heads or [w.T for w in depth.codebooks_head.weight]
        self.linear = self.linear_for(F.linear)  # batch 1: transformers' numbers in float

    def linear_for(self, linear: Callable) -> Callable:
        """``linear`` as the loop calls it: with int8 weights, one that also takes those."""
        return dispatching(linear) if self.quantized else linear

    # -- prompt -----------------------------------------------------------------
    @torch.inference_mode()
    def encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """Mimi codes ``(frames, num_codebooks)`` of one 24 kHz mono clip."""
        values = audio.to(self.device, self.model.codec_model.dtype).view(1, 1, -1)
        codes = self.model.codec_model.encode(values).audio_codes  # (1, nq, frames)
        return codes[0, : self.num_codebooks].transpose(0, 1)

    @torch.inference_mode()
    def embed_prompt(self, input_ids: torch.Tensor, clips: list[torch.Tensor]) -> torch.Tensor:
        """Backbone input embeddings for one prompt.

        ``input_ids`` is the processor's ``(seq,)`` text with one ``<|AUDIO|>`` per
        audio frame; ``clips`` are the codes of each audio turn in order (from
        :meth:`encode_audio`, so they can be cached per reference clip).
        """
        cfg = self.config
        input_ids = input_ids.to(self.device)
        embeds = self.model.embed_text_tokens(input_ids)
        audio_positions = input_ids == cfg.audio_token_id
        if clips:
            codes = torch.cat([c.to(self.device) for c in clips], dim=0)
            if codes.shape[0] != int(audio_positions.sum()):
                raise ValueError(
                    f"prompt has {int(audio_positions.sum())} audio slots for {codes.shape[0]} frames"
                )
            embeds[audio_positions] = self.model.backbone_model.embed_tokens(codes[None])[0]
        eos_positions = input_ids == cfg.audio_eos_token_id
        if eos_positions.any():
            eos_frame = torch.full((1, 1, self.num_codebooks), cfg.codebook_eos_token_id, device=self.device)
            embeds[eos_positions] = self.model.backbone_model.embed_tokens(eos_frame)[0, 0]
        return embeds

    # -- sampling ---------------------------------------------------------------
    def _pick(self, logits: torch.Tensor, sampling: Sampling, rng: torch.Generator | None) -> torch.Tensor:
        """Sample one id per row exactly as transformers' processors would."""
        scores = logits.float()
        scores[:, self.codec_size :] = -float("inf")
        if sampling.top_k == 1:
            return scores.argmax(dim=-1)
        # A tiny temperature turns finite scores into +inf, and softmax of inf - inf is NaN (multinomial then
        # fails, or asserts on CUDA): capping at the largest float keeps the distribution defined and leaves
        # every ordinary score bit for bit as it was.
        scores = (scores / sampling.temperature).clamp(max=torch.finfo(scores.dtype).max)
        k = min(sampling.top_k, scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
        probs = F.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=rng).squeeze(1)

    # -- the loop ---------------------------------------------------------------
    def sample_frame(self, hidden: torch.Tensor, pick: Callable[[torch.Tensor], torch.Tensor],
                     linear: Callable | None = None) -> torch.Tensor:
        """One frame ``(rows, num_codebooks)`` from the backbone's last hidden states ``(rows, hidden)``.

        ``pick`` turns ``(rows, vocab)`` logits into ``(rows,)`` ids; a batch gives
        each row its own sampling settings and RNG through it.  ``linear`` is
        ``F.linear`` (transformers' numbers; the default) or :func:`skinny_linear`
        (batches), through :meth:`linear_for`.
        """
        linear = linear or self.linear
        first = pick(linear(hidden, self.model.lm_head.weight))
        return self._depth_frame(hidden, first, pick, linear)

    def picker(self, sampling: Sampling, rng: torch.Generator | None) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda logits: self._pick(logits, sampling, rng)

    def is_end(self, frame: torch.Tensor) -> bool:
        """CSM's end of audio: codebooks 0..N-2 all ``codebook_eos_token_id`` (as in ``generate``)."""
        return bool((frame[:-1] == self.config.codebook_eos_token_id).all())

    def _depth_frame(self, hidden: torch.Tensor, first: torch.Tensor,
                     pick: Callable[[torch.Tensor], torch.Tensor], linear: Callable) -> torch.Tensor:
        """Codebooks 1..N-1 from the backbone's last hidden state and codebook 0.

        The 31 steps call the depth decoder's own submodules and attention
        function in transformers' order (so the numbers are the same) but skip
        the per-step machinery around them: module wrappers, cache objects,
        mask building.  Rotary tables are computed once per frame.
        """
        dd = self.model.depth_decoder
        inner = dd.model
        vocab = dd.config.vocab_size
        table = inner.embed_tokens.weight
        # Position 0 holds the backbone state, position 1 codebook 0 (offset 0).
        embeds = F.embedding(torch.stack([torch.zeros_like(first), first], dim=1), table)
        embeds[:, 0] = hidden
        positions = torch.arange(self.num_codebooks, device=self.device)[None]
        cos_all, sin_all = (t.unsqueeze(1) for t in inner.rotary_emb(embeds, position_ids=positions))
        past: list[tuple[torch.Tensor, torch.Tensor] | tuple[None, None]] = [(None, None)] * len(self._depth_layers)
        codes = [first]
        position = 0
        for step in range(1, self.num_codebooks):
            x = linear(embeds, self._depth_projector)
            length = x.shape[1]
            cos = cos_all[:, :, position:position + length]
            sin = sin_all[:, :, position:position + length]
            for index, layer in enumerate(self._depth_layers):
                x, *past[index] = self._layer_step(layer, x, cos, sin, *past[index], linear)
            x = _rms_norm(x[:, -1:], inner.norm.weight, inner.norm.variance_epsilon)
            logits = linear(x[:, 0], self._depth_heads[step - 1])
            code = pick(logits)
            codes.append(code)
            position += length
            embeds = F.embedding((code + step * vocab)[:, None], table)
        return torch.stack(codes, dim=1)

    @torch.inference_mode()
    def frames(self, embeds: torch.Tensor, sampling: Sampling, max_frames: int,
               rng: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield up to ``max_frames`` frames of codes, stopping before the end-of-audio frame.

        The caller may stop iterating at any frame boundary (cancellation); the
        cache is local, so nothing is left behind.
        """
        hidden, prefilled = self.prefill(embeds)
        position = embeds.shape[0]  # of the first generated frame
        cache = RowCache(self.config, 1, position + max_frames, hidden.dtype, self.device)
        cache.load(0, prefilled)
        pick = self.picker(sampling, rng)
        for n in range(max_frames):
            frame = self.sample_frame(hidden, pick)
            if self.is_end(frame[0]):
                return
            yield frame[0]
            if n + 1 < max_frames:
                at = position + n
                hidden = self.backbone_step(frame, torch.tensor([at], device=self.device), {0: at + 1}, cache)

    def backbone_step(self, frames: torch.Tensor, positions: torch.Tensor, lengths: dict[int, int],
                      cache: "RowCache", linear: Callable | None = None) -> torch.Tensor:
        """The backbone on one frame per row: last hidden states ``(rows, hidden)``.

        ``frames`` ``(rows, num_codebooks)`` go to ``positions`` ``(rows,)`` of
        ``cache``; row ``slot`` then attends over its first ``lengths[slot]``
        positions (rows not in ``lengths`` are idle).  ``CsmBackboneModel.forward``'s
        operations for one new position (decode needs no mask), without its
        per-call machinery.
        """
        backbone, linear = self.model.backbone_model, linear or self.linear
        cache.write_at = positions
        x = backbone.embed_tokens(frames[:, None, :])
        cos, sin = (t.unsqueeze(1) for t in backbone.rotary_emb(x, position_ids=positions[:, None]))
        for index, layer in enumerate(self._backbone_layers):
            x = _cached_layer_step(layer, x, cos, sin, cache, index, lengths, linear)
        return _rms_norm(x[:, -1], backbone.norm.weight, backbone.norm.variance_epsilon)

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor) -> tuple[torch.Tensor, DynamicCache]:
        """Run the prompt through the backbone alone: its last hidden state ``(1, hidden)`` and KV cache."""
        cache = DynamicCache(config=self.config)
        out = self.model.backbone_model(inputs_embeds=embeds[None], past_key_values=cache, use_cache=True)
        return out.last_hidden_state[:, -1], cache


@dataclass(frozen=True)
class _Layer:
    """One CSM decoder layer's tensors (backbone or depth decoder), looked up once: module access is slow per step."""

    gqa: bool  # fewer key/value heads than query heads
    norm1: torch.Tensor
    norm2: torch.Tensor
    eps: float
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    act: Callable
    head_dim: int
    scaling: float

    @classmethod
    def of(cls, layer) -> "_Layer":
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(linear.bias is not None for linear in linears):
            raise ValueError("the lean steps expect bias-free projections (as CSM-1B has)")
        return cls(attn.num_key_value_groups > 1, layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                   layer.input_layernorm.variance_epsilon, *(linear.weight for linear in linears), mlp.act_fn,
                   attn.head_dim, attn.scaling)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``CsmRMSNorm.forward``, operation for operation (the casts are no-ops in float32, so skipped)."""
    dtype = x.dtype
    if dtype != torch.float32:
        x = x.to(torch.float32)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (normed if dtype == torch.float32 else normed.to(dtype))


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``apply_rotary_pos_emb`` for one tensor, ``cos``/``sin`` already unsqueezed for the heads."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


def _attend(layer: "_Layer", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """transformers' ``sdpa_attention_forward`` without a mask: ``(batch, positions, heads, head_dim)``.

    ``causal`` when several positions are new (the depth decoder's first step,
    where keys and queries cover the same positions; a plain bool, so that
    ``torch.compile`` need not break its graph on a shape test); grouped-query
    heads go to SDPA as they are, as transformers does when there is no mask.
    """
    out = F.scaled_dot_product_attention(q, k, v, scale=layer.scaling, is_causal=causal,
                                         **({"enable_gqa": True} if layer.gqa else {}))
    return out.transpose(1, 2).contiguous()


def skinny_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for a few rows, computed as ``(weight @ x.T).T``.

    On CPU (MKL) a matrix times 2-4 vectors runs 2-3x faster in this
    orientation than as ``F.linear``, which is no faster for 4 rows than for 1
    (measured: docs/benchmarks.md).  It is not bitwise equal to ``F.linear``,
    so only the batched path uses it; batch 1 keeps transformers' numbers.
    A transposed weight (the depth decoder's heads) is the other way round.
    """
    if not weight.is_contiguous():
        return F.linear(x, weight)
    flat = x.reshape(-1, x.shape[-1]).contiguous()  # a contiguous x is what makes MKL take the fast kernel
    return (weight @ flat.T).T.contiguous().view(*x.shape[:-1], weight.shape[0])


def _layer_step(layer: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor | None,
                values: torch.Tensor | None, linear: Callable = F.linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One CSM decoder layer on new positions ``x`` after cached ``keys``/``values``: (output, keys, values).

    With ``F.linear``: the same operations, in the same order, as
    ``CsmDecoderLayer.forward`` with a ``DynamicCache`` and SDPA
    (``tests/test_csm_exactness.py`` holds us to it).  Tensors in, tensors
    out: under ``torch.compile`` every layer and step shares a few graphs
    (first step or later, per ``linear``) instead of one per layer index.
    """
    q, k, v = _qkv(layer, x, cos, sin, linear)
    first = keys is None  # the first step: the backbone state and codebook 0, attending causally
    if not first:
        k = torch.cat([keys, k], dim=-2)
        v = torch.cat([values, v], dim=-2)
    out = _attend(layer, q, k, v, causal=first)
    x = x + linear(out.reshape(*x.shape[:-1], -1).contiguous(), layer.o)
    return _mlp(layer, x, linear), k, v


def _qkv(layer: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, linear: Callable):
    """The layer's first half up to attention: queries, keys, values ``(batch, heads, positions, head_dim)``."""
    h = _rms_norm(x, layer.norm1, layer.eps)
    shape = (*h.shape[:-1], -1, layer.head_dim)
    q = linear(h, layer.q).view(shape).transpose(1, 2)
    k = linear(h, layer.k).view(shape).transpose(1, 2)
    v = linear(h, layer.v).view(shape).transpose(1, 2)
    return _rotary(q, cos, sin), _rotary(k, cos, sin), v


def _mlp(layer: _Layer, x: torch.Tensor, linear: Callable) -> torch.Tensor:
    """The layer's second half (``CsmDecoderLayer.forward`` after attention), residual included."""
    h = _rms_norm(x, layer.norm2, layer.eps)
    return x + linear(layer.act(linear(h, layer.gate)) * linear(h, layer.up), layer.down)


class RowCache:
    """Preallocated backbone KV cache: ``rows`` sequences of up to ``length`` positions each.

    ``update`` writes each row's new key/value at that row's own position
    (``write_at``), so rows at different lengths share one tensor per layer
    and a step never reallocates.
    """

    def __init__(self, config, rows: int, length: int, dtype: torch.dtype, device) -> None:
        shape = (rows, config.num_key_value_heads, length, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.write_at = torch.zeros(rows, dtype=torch.long, device=device)
        self._rows = torch.arange(rows, device=device)

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one new position per row (``(rows, heads, 1, head_dim)``); the layer's whole cache."""
        self.keys[layer][self._rows, :, self.write_at] = keys[:, :, 0]
        self.values[layer][self._rows, :, self.write_at] = values[:, :, 0]
        return self.keys[layer], self.values[layer]

    def load(self, slot: int, prefill: DynamicCache) -> None:
        """Copy one prefilled sequence (batch 1) into ``slot``."""
        for index, layer in enumerate(prefill.layers):
            length = layer.keys.shape[2]
            self.keys[index][slot, :, :length] = layer.keys[0]
            self.values[index][slot, :, :length] = layer.values[0]


def _cached_layer_step(layer: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: RowCache,
                       index: int, lengths: dict[int, int], linear: Callable) -> torch.Tensor:
    """One backbone layer for one new position per row (``x``: ``(rows, 1, hidden)``), writing into ``cache``.

    ``CsmDecoderLayer.forward``'s operations, except that each row attends on
    its own over its ``lengths[slot]`` cached positions (no mask, no repeated
    key/value heads: SDPA's grouped-query path); rows not in ``lengths`` are idle.
    """
    q, k, v = _qkv(layer, x, cos, sin, linear)
    keys, values = cache.update(k, v, index)
    out = torch.zeros_like(q.transpose(1, 2))  # (rows, 1, heads, head_dim), as SDPA returns it
    for slot, length in lengths.items():
        out[slot:slot + 1] = _attend(layer, q[slot:slot + 1], keys[slot:slot + 1, :, :length],
                                     values[slot:slot + 1, :, :length], causal=False)
    x = x + linear(out.reshape(x.shape[0], 1, -1), layer.o)
    return _mlp(layer, x, linear)
