"""Teacher-forced logits: how far a reduced-precision CSM strays from float32, step by step.

``bench/precision.py`` prints the figures for a user's own weights before they
turn ``--quantize int8`` on; the tests hold the tiny model to them.
"""

from __future__ import annotations

import torch

from .csm_decode import RowCache, Sampling


def logits_along(engine, text: str, count: int, frames: torch.Tensor | None = None,
                 seed: int = 7) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(frames, logits of every codebook step) for ``count`` frames of ``text`` at batch 1.

    ``frames=None``: the engine samples (seeded) and its frames are returned;
    else it is fed ``frames`` (teacher forcing), so two engines' logits line up.
    """
    decoder = engine.decoder
    embeds = decoder.embed_prompt(engine.prompt_ids([], text, 0), [])
    sample = decoder.picker(Sampling(), torch.Generator(device=decoder.device).manual_seed(seed))
    logits: list[torch.Tensor] = []
    produced = []
    with torch.inference_mode():
        hidden, prefilled = decoder.prefill(embeds)
        cache = RowCache(decoder.config, 1, embeds.shape[0] + count, hidden.dtype, decoder.device)
        cache.load(0, prefilled)
        for n in range(count):
            step = iter(range(decoder.num_codebooks))

            def pick(scores: torch.Tensor) -> torch.Tensor:
                logits.append(scores[0, : decoder.codec_size].float().cpu())
                index = next(step)
                return sample(scores) if frames is None else frames[n, index][None].to(decoder.device)

            frame = decoder.sample_frame(hidden, pick)
            produced.append(frame[0].cpu())
            at = embeds.shape[0] + n
            hidden = decoder.backbone_step(frame, torch.tensor([at], device=decoder.device), {0: at + 1}, cache)
    return torch.stack(produced), logits
