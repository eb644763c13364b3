"""int8 weights for CSM's projections (``--quantize int8``): quantized once at load, used by every forward.

On a CPU, CSM is bound by reading its weights (~19 GB per frame in float32);
int8 reads a quarter of that.  Every ``nn.Linear`` of the backbone, the depth
decoder and both heads becomes an ``Int8Linear``: int8 weights with one
float scale per output channel (symmetric, ``absmax / 127``); the float
weights are dropped.  Embeddings, norms and the Mimi codec stay as they are.

The kernel is weight-only: ``torch._weight_int8pack_mm`` (CPU, CUDA and MPS
in torch 2.13), activations stay in the model's dtype (bfloat16 is the fast
one on a CPU).  Each output row depends on its input row alone, so a seeded
request gets the same tokens alone or in a batch.  fbgemm's dynamic W8A8
(int8 activations too) is faster at one row but measured far less faithful
on CSM (docs/benchmarks.md, ``bench/precision.py``), so it is not used.
"""

from __future__ import annotations

import torch
from torch import nn


class Int8Weight:
    """An ``(out, in)`` int8 matrix with per-output-channel scales."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor) -> None:
        self.values, self.scales = values, scales
        self._scales_as: dict[torch.dtype, torch.Tensor] = {torch.float32: scales}

    @classmethod
    def of(cls, weight: torch.Tensor) -> "Int8Weight":
        weight = weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        values = (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        return cls(values.contiguous(), scales)

    @property
    def out_features(self) -> int:
        return self.values.shape[0]

    def scales_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The scales in the activations' dtype (the kernel wants them alike), converted once."""
        if dtype not in self._scales_as:
            self._scales_as[dtype] = self.scales.to(dtype)
        return self._scales_as[dtype]

    def nbytes(self) -> int:
        return self.values.numel() + self.scales.numel() * self.scales.element_size()


def int8_linear(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """``F.linear(x, W)`` for an int8 ``W``, in ``x``'s dtype."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch._weight_int8pack_mm(flat, weight.values, weight.scales_as(flat.dtype))
    return out.view(*x.shape[:-1], weight.out_features)


class Int8Linear(nn.Module):
    """A bias-free ``nn.Linear`` whose weight is an ``Int8Weight``."""

    bias = None

    def __init__(self, weight: Int8Weight) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight)


def dispatching(linear):
    """``linear`` (``F.linear`` or ``skinny_linear``) that also takes ``Int8Weight`` matrices."""

    def run(x: torch.Tensor, weight) -> torch.Tensor:
        return int8_linear(x, weight) if isinstance(weight, Int8Weight) else linear(x, weight)

    return run


def quantize_model(model) -> int:
    """Replace the projections of CSM's backbone, depth decoder and heads by int8 ones, in place.

    Returns the bytes the int8 weights take.  The depth decoder's per-codebook
    heads (one ``(hidden, vocab)`` parameter) become ``model.int8_depth_heads``.
    """
    total = 0
    for parent in (model.backbone_model, model.depth_decoder.model, model):
        for name, module in list(parent.named_modules()):
            if isinstance(module, nn.Linear) and (parent is not model or name == "lm_head"):
                if module.bias is not None:
                    raise ValueError(f"{name} has a bias; CSM's projections have none")
                quantized = Int8Linear(Int8Weight.of(module.weight))
                owner = parent.get_submodule(name.rpartition(".")[0]) if "." in name else parent
                setattr(owner, name.rpartition(".")[2], quantized)
                total += quantized.weight.nbytes()
    heads = model.depth_decoder.codebooks_head
    model.int8_depth_heads = [Int8Weight.of(w.T) for w in heads.weight]
    total += sum(w.nbytes() for w in model.int8_depth_heads)
    heads.weight = nn.Parameter(torch.empty(0, device=heads.weight.device), requires_grad=False)  # float copy gone
    return total
