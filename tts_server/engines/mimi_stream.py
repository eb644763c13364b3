"""Exact streaming Mimi decoding: frames in pieces of any size, samples as if decoded whole.

transformers' ``MimiModel.decode`` keeps a KV cache for the decoder transformer
but no state for the SEANet convolutions, so decoding a stream chunk by chunk
clicks at every boundary (and re-decoding from the start costs more per frame
the longer the stream).  This decoder runs the same modules and carries, across
calls:

- for each causal ``MimiConv1d`` (all stride 1 in the decoder): the last
  ``kernel - stride`` input samples, which stand in for the zero left-padding;
- for each ``MimiConvTranspose1d``: the ``kernel - stride`` output samples that
  overlap the next input (overlap-add, bias counted once) -- these are exactly
  what whole-file decoding trims off the right end, so the end needs no flush;
- the decoder transformer's KV cache, a sliding-window cache bounded by Mimi's
  ``sliding_window``.

Each frame is decoded once; state size does not depend on stream length.
``tests/test_streaming.py`` proves equality with whole-file decoding.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

FRAME_SAMPLES = 1920  # 80 ms at 24 kHz


class MimiStreamDecoder:
    """Stateful decoder for one audio stream; make one per stream (or call ``reset``)."""

    def __init__(self, codec) -> None:
        self.codec = codec
        self.decoder = codec.decoder
        if codec.config.pad_mode != "constant" or not codec.config.use_causal_conv:
            raise ValueError("streaming needs a causal codec with zero padding")
        self.reset()

    def reset(self) -> None:
        self._state: dict[int, torch.Tensor] = {}
        self._cache = DynamicCache(config=self.decoder.config)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Samples (float32, CPU) for ``codes`` of shape ``(frames, num_codebooks)`` following earlier calls."""
        if codes.shape[0] == 0:
            return torch.zeros(0)
        device = next(self.codec.parameters()).device
        latents = self.codec.quantizer.decode(codes.transpose(0, 1)[None].to(device))
        x = latents if self.decoder.upsample is None else self._transposed(self.decoder.upsample, latents)
        hidden = self.decoder.decoder_transformer(x.transpose(1, 2), past_key_values=self._cache, use_cache=True)
        x = hidden.last_hidden_state.transpose(1, 2)
        for layer in self.decoder.decoder_seanet.layers:
            x = self._layer(layer, x)
        return x[0, 0].float().cpu()

    def _layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        kind = type(layer).__name__
        if kind == "MimiConv1d":
            return self._conv(layer, x)
        if kind == "MimiConvTranspose1d":
            return self._transposed(layer, x)
        if kind == "MimiResnetBlock":
            if not isinstance(layer.shortcut, nn.Identity):
                raise ValueError("streaming supports identity shortcuts only")
            residual = x
            for inner in layer.block:
                x = self._layer(inner, x)
            return residual + x
        return layer(x)  # pointwise (ELU)

    def _conv(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        conv = layer.conv
        if conv.stride[0] != 1:
            raise ValueError("streaming supports stride-1 convolutions in the decoder only")
        keep = int(layer.padding_total)
        past = self._state.get(id(layer))
        if past is None:
            past = x.new_zeros(x.shape[0], x.shape[1], keep)
        x = torch.cat([past, x], dim=-1)
        if keep:
            self._state[id(layer)] = x[..., -keep:]
        return conv(x)

    def _transposed(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        conv = layer.conv
        stride = conv.stride[0]
        y = conv(x)
        bias = conv.bias
        if bias is not None:
            y = y - bias[None, :, None]
        overlap = self._state.get(id(layer))
        if overlap is not None:
            y[..., : overlap.shape[-1]] += overlap
        ready = x.shape[-1] * stride
        self._state[id(layer)] = y[..., ready:]
        y = y[..., :ready]
        return y if bias is None else y + bias[None, :, None]
