"""What caching reference-clip codes saves per request.

transformers' CSM processor hands context audio to the model as samples and
the model re-encodes it with Mimi on every call.  Our engine encodes each
reference clip once and keeps its codes.  This prints, per request with one
emotion reference of --seconds, the prompt-preparation time both ways on a
full-size random Mimi codec (CSM-1B's codec shape), medians of --runs.

    python bench/reference_cache.py [--seconds 5] [--runs 7]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import machine, median, table
from tts_server.engines.base import ContextTurn
from tts_server.engines.tiny_csm import randomize_codebooks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    from transformers import MimiConfig, MimiModel

    torch.manual_seed(0)
    codec = MimiModel(MimiConfig()).eval()
    randomize_codebooks(codec)
    clip = torch.from_numpy(np.random.default_rng(0).normal(0, 0.1, int(args.seconds * 24000)).astype(np.float32))

    def encode() -> torch.Tensor:
        with torch.inference_mode():
            return codec.encode(clip.view(1, 1, -1)).audio_codes[0].transpose(0, 1)

    turn = ContextTurn(0, "reference", clip.numpy())

    def cached() -> torch.Tensor:
        codes = turn.cache.get("csm")
        if codes is None:
            codes = turn.cache["csm"] = encode()
        return codes

    encode(), cached()  # warm-up (and fill the cache)
    every, once = [], []
    for _ in range(args.runs):
        started = time.perf_counter()
        encode()
        every.append(time.perf_counter() - started)
        started = time.perf_counter()
        cached()
        once.append(time.perf_counter() - started)
    e, c = median(every), median(once)
    print(f"machine: {machine()}; {args.seconds:g} s reference clip, full-size random Mimi, {args.runs} runs")
    print(table(["per request", "ms (median)", "speed-up"],
                [["re-encode the clip (transformers' path)", 1000 * e, 1.0],
                 ["cached codes (ours)", 1000 * c, e / max(c, 1e-9)]]))


if __name__ == "__main__":
    main()
