"""How much error one matrix multiply picks up from each weight format, on weights shaped and scaled like CSM's.

Random weights (normal, std 0.02, as ``CsmConfig``'s initializer draws them)
for one backbone MLP projection (2048 -> 8192) and random activations; the
output of each format is compared to float32 (relative L2 error of the
product).  The bits per weight set the bytes each frame reads, which is what
bounds CSM's speed on a CPU; the error per multiply is what accumulates into
the logits over the ~100 multiplies of a frame (``bench/precision.py`` measures
that end to end).  Ratio: error vs bfloat16 weights.

    python bench/quant_error.py [--rows 64] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch

from _common import machine, table


def int8(weight: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """Symmetric int8 with one scale per output channel, or per ``group`` inputs of it; dequantized."""
    out, inputs = weight.shape
    grouped = weight.reshape(out, inputs // (group or inputs), group or inputs)
    scale = grouped.abs().amax(2, keepdim=True) / 127
    return ((grouped / scale).round().clamp(-127, 127) * scale).reshape(out, inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    weight = torch.randn(8192, 2048) * 0.02
    x = torch.randn(args.rows, 2048)
    exact = x @ weight.T
    formats = [("bfloat16", 16, weight.bfloat16().float()),
               ("int8, scale per output channel (ours)", 8, int8(weight)),
               ("int8, scale per 128 inputs", 8 + 16 / 128, int8(weight, 128)),
               ("int8, scale per 32 inputs", 8 + 16 / 32, int8(weight, 32))]
    errors = [float((x @ w.T - exact).norm() / exact.norm()) for _, _, w in formats]
    rows = [[name, round(bits, 2), round(100 * err, 3), round(err / errors[0], 2)]
            for (name, bits, _), err in zip(formats, errors)]
    print(f"Machine: {machine()}; one 2048 -> 8192 projection, {args.rows} rows, seed {args.seed}\n")
    print(table(["weights", "bits per weight", "rel. L2 error %", "ratio vs bfloat16"], rows))


if __name__ == "__main__":
    main()
