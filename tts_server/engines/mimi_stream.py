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

from ..audio.pcm import FRAME_SAMPLES


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


class MimiStreamEncoder:
    """Mimi codes of a clip that arrives in pieces (a turn streamed while someone speaks).

    Whole 80 ms frames are encoded as soon as they are in, carrying transformers'
    own streaming state (the causal convolutions' ``padding_cache`` and the
    encoder transformer's ``encoder_past_key_values``) from call to call; the
    last partial frame waits for ``finish``, which pads it with zeros.  The codes
    equal one encode of the whole clip zero-padded to whole frames
    (``tests/engines/test_streaming.py``), so at the end only the last fraction of
    a frame is left to encode, however long the clip.
    """

    def __init__(self, codec, num_codebooks: int) -> None:
        self.codec, self.num_codebooks = codec, num_codebooks
        self._held = torch.zeros(0)
        self._past = self._padding = None
        self._codes: list[torch.Tensor] = []
        self.samples = 0

    @torch.inference_mode()
    def feed(self, samples: torch.Tensor) -> None:
        """Add 24 kHz mono float samples; encodes every whole frame now in."""
        self.samples += len(samples)
        self._held = torch.cat([self._held, samples.float()])
        whole = len(self._held) // FRAME_SAMPLES * FRAME_SAMPLES
        if whole:
            self._encode(self._held[:whole])
            self._held = self._held[whole:]

    @torch.inference_mode()
    def finish(self) -> torch.Tensor:
        """All codes ``(frames, num_codebooks)``, the last partial frame zero-padded."""
        if len(self._held):
            self._encode(nn.functional.pad(self._held, (0, FRAME_SAMPLES - len(self._held))))
            self._held = torch.zeros(0)
        return torch.cat(self._codes) if self._codes else torch.zeros(0, self.num_codebooks, dtype=torch.long)

    def _encode(self, samples: torch.Tensor) -> None:
        values = samples.to(self.codec.device, self.codec.dtype).view(1, 1, -1)
        out = self.codec.encode(values, encoder_past_key_values=self._past, padding_cache=self._padding,
                                use_streaming=True)
        self._past, self._padding = out.encoder_past_key_values, out.padding_cache
        self._codes.append(out.audio_codes[0, : self.num_codebooks].transpose(0, 1))
