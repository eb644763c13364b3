"""int8 and bfloat16 matrix kernels on one CSM-1B backbone layer's seven projections, at 1 and 4 rows.

Candidates for ``--quantize int8`` (per-output-channel int8 weights), timed in
one process against float32 ``F.linear`` (the baseline, ratio 1):

- float32 ``F.linear`` and ``skinny_linear`` (what batch 1 and the batch use today);
- bfloat16 ``F.linear``;
- dynamic W8A8: ``torch.ops.quantized.linear_dynamic`` (fbgemm/x86; one activation scale for all rows, so a
  row's numbers depend on its neighbours), and the same called row by row (row-independent);
- weight-only int8 (``--quantize int8``): ``torch._weight_int8pack_mm`` with float32 and bfloat16 activations.

    python bench/quant_kernels.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F

from _common import machine, median, table
from tts_server.engines.csm_decode import skinny_linear
from tts_server.engines.quantize import Int8Weight, int8_linear

SHAPES = [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192)]


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return median(times)


def main(repeats: int) -> None:
    torch.manual_seed(0)
    weights = [torch.randn(out, inp) * 0.02 for out, inp in SHAPES]
    packed = [torch.ops.quantized.linear_prepack(  # (deprecated quantized tensors: torch warns once)
        torch.quantize_per_channel(w, w.abs().amax(1) / 127, torch.zeros(w.shape[0], dtype=torch.long), 0,
                                   torch.qint8), None) for w in weights]
    weight_only = [Int8Weight.of(w) for w in weights]
    bf16 = [w.bfloat16() for w in weights]
    rows_list = (1, 4)
    results: dict[str, dict[int, float]] = {}

    def run(name, step):
        results[name] = {}
        for rows in rows_list:
            xs = {inp: torch.randn(rows, inp) for _, inp in SHAPES}
            results[name][rows] = timed(lambda: [step(i, xs[inp]) for i, (_, inp) in enumerate(SHAPES)], repeats)

    run("float32 F.linear (baseline)", lambda i, x: F.linear(x, weights[i]))
    run("float32 skinny_linear (batch path)", lambda i, x: skinny_linear(x, weights[i]))
    run("bfloat16 F.linear", lambda i, x: F.linear(x.bfloat16(), bf16[i]))
    run("W8A8 per tensor (linear_dynamic)", lambda i, x: torch.ops.quantized.linear_dynamic(x, packed[i], True))
    run("W8A8 per tensor, row by row", lambda i, x: torch.cat([torch.ops.quantized.linear_dynamic(r, packed[i], True)
                                                               for r in x.split(1)]))
    run("weight-only int8, float32 act.", lambda i, x: int8_linear(x, weight_only[i]))
    run("weight-only int8, bfloat16 act.", lambda i, x: int8_linear(x.bfloat16(), weight_only[i]))
    base = results["float32 F.linear (baseline)"]
    print(f"{machine()}; one backbone layer's 7 projections; median of {repeats}")
    print(table(["kernel", "1 row (ms)", "speed-up", "4 rows (ms)", "speed-up"],
                [[name, r[1] * 1000, base[1] / r[1], r[4] * 1000, base[4] / r[4]] for name, r in results.items()]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    main(parser.parse_args().repeats)
