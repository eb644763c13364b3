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
``tests/test_csm_decode.py`` proves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.nn import functional as F
from transformers import DynamicCache


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

    def __init__(self, model) -> None:
        self.model = model
        self.config = model.config
        self.num_codebooks = model.config.num_codebooks
        # CSM-1B's codebook vocabulary (2051) is larger than the codec's (2048):
        # the extra ids are special and must never be sampled or decoded.
        self.codec_size = model.config.codec_config.codebook_size
        self.device = model.lm_head.weight.device

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
        scores = scores / sampling.temperature
        k = min(sampling.top_k, scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
        probs = F.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=rng).squeeze(1)

    # -- the loop ---------------------------------------------------------------
    def sample_frame(self, hidden: torch.Tensor, pick: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One frame ``(rows, num_codebooks)`` from the backbone's last hidden states ``(rows, hidden)``.

        ``pick`` turns ``(rows, vocab)`` logits into ``(rows,)`` ids; a batch gives
        each row its own sampling settings and RNG through it.
        """
        first = pick(self.model.lm_head(hidden))
        return self._depth_frame(hidden, first, pick)

    def picker(self, sampling: Sampling, rng: torch.Generator | None) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda logits: self._pick(logits, sampling, rng)

    def is_end(self, frame: torch.Tensor) -> bool:
        """CSM's end of audio: codebooks 0..N-2 all ``codebook_eos_token_id`` (as in ``generate``)."""
        return bool((frame[:-1] == self.config.codebook_eos_token_id).all())

    def _depth_frame(self, hidden: torch.Tensor, first: torch.Tensor,
                     pick: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Codebooks 1..N-1 from the backbone's last hidden state and codebook 0."""
        dd = self.model.depth_decoder
        inner = dd.model
        vocab = dd.config.vocab_size
        cache = DynamicCache(config=dd.config)
        # Position 0 holds the backbone state, position 1 codebook 0 (offset 0).
        embeds = inner.embed_tokens(torch.stack([torch.zeros_like(first), first], dim=1))
        embeds[:, 0] = hidden
        codes = [first]
        position = 0
        for step in range(1, self.num_codebooks):
            x = inner.inputs_embeds_projector(embeds)
            length = x.shape[1]
            positions = torch.arange(position, position + length, device=self.device)[None]
            rotary = inner.rotary_emb(x, position_ids=positions)
            for layer in inner.layers:
                x = layer(x, attention_mask=None, position_ids=positions, past_key_values=cache,
                          use_cache=True, position_embeddings=rotary)
            x = inner.norm(x[:, -1:])
            logits = F.linear(x[:, 0], dd.codebooks_head.weight[step - 1].T)
            code = pick(logits)
            codes.append(code)
            position += length
            embeds = inner.embed_tokens((code + step * vocab)[:, None])
        return torch.stack(codes, dim=1)

    @torch.inference_mode()
    def frames(self, embeds: torch.Tensor, sampling: Sampling, max_frames: int,
               rng: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield up to ``max_frames`` frames of codes, stopping before the end-of-audio frame.

        The caller may stop iterating at any frame boundary (cancellation); the
        cache is local, so nothing is left behind.
        """
        backbone = self.model.backbone_model
        cache = DynamicCache(config=self.config)
        x = embeds[None] if embeds.dim() == 2 else embeds
        pick = self.picker(sampling, rng)
        for _ in range(max_frames):
            hidden = backbone(inputs_embeds=x, past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
            frame = self.sample_frame(hidden, pick)
            if self.is_end(frame[0]):
                return
            yield frame[0]
            x = backbone.embed_tokens(frame[:, None, :])

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor) -> tuple[torch.Tensor, DynamicCache]:
        """Run the prompt through the backbone alone: its last hidden state ``(1, hidden)`` and KV cache."""
        cache = DynamicCache(config=self.config)
        out = self.model.backbone_model(inputs_embeds=embeds[None], past_key_values=cache, use_cache=True)
        return out.last_hidden_state[:, -1], cache
