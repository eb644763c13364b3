"""Streaming vs whole-file CSM: time to first audio, total time, and Mimi decode cost per frame.

For each model (tiny random CSM; full-size random CSM unless --tiny-only) one
request of FRAMES frames is generated twice with the same seed, alternating:

- streamed: our engine as the server runs it (first chunk after 2 frames, then
  every 6, one stateful Mimi decoder);
- whole-file: the same frames generated first, then one ``codec.decode`` call
  (what a non-streaming server does).

Then Mimi alone: our streaming decoder fed 2/6-frame pieces, whole-file decode,
and naive re-decoding of the growing prefix at each chunk (what servers without
decoder state do).  Prints medians and ratios against the whole-file baseline.

    python bench/streaming.py [--frames 25] [--runs 3] [--tiny-only]
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import machine, median, table
from models import full_engine, tiny_engine
from tts_server.engines.base import SynthesisTask
from tts_server.engines.csm_decode import Sampling
from tts_server.engines.mimi_stream import MimiStreamDecoder
from tts_server.engines.request import SynthesisRequest

TEXT = "Streaming lets the listener hear the first words while the rest is still being generated."


def streamed(engine, frames: int) -> tuple[float, float]:
    request = SynthesisRequest(text=TEXT, request_id="bench", seed=1, max_audio_length_ms=frames * 80)
    started = time.perf_counter()
    first = None
    for _ in engine.synthesize(SynthesisTask(request)):
        first = first or time.perf_counter() - started
    return first, time.perf_counter() - started


def whole_file(engine, frames: int) -> tuple[float, float]:
    started = time.perf_counter()
    decoder = engine.decoder
    embeds = decoder.embed_prompt(engine.prompt_ids([], TEXT, 0), [])
    codes = torch.stack(list(decoder.frames(embeds, Sampling(), frames, torch.Generator().manual_seed(1))))
    with torch.inference_mode():
        engine.model.codec_model.decode(codes.transpose(0, 1)[None])
    total = time.perf_counter() - started
    return total, total


def mimi_costs(codec, frames: int) -> dict[str, float]:
    codes = torch.randint(0, codec.config.codebook_size, (frames, 32), generator=torch.Generator().manual_seed(0))
    costs = {}
    with torch.inference_mode():
        started = time.perf_counter()
        codec.decode(codes.transpose(0, 1)[None])
        costs["whole-file decode"] = (time.perf_counter() - started) / frames
        for piece in (2, 6):
            decoder = MimiStreamDecoder(codec)
            started = time.perf_counter()
            for i in range(0, frames, piece):
                decoder.decode(codes[i:i + piece])
            costs[f"streaming decode, {piece}-frame pieces"] = (time.perf_counter() - started) / frames
        started = time.perf_counter()
        for end in range(6, frames + 1, 6):
            codec.decode(codes[:end].transpose(0, 1)[None])
        costs["re-decode prefix every 6 frames"] = (time.perf_counter() - started) / frames
    return costs


def run(name: str, engine, frames: int, runs: int) -> None:
    streamed(engine, 2), whole_file(engine, 2)  # warm-up
    s_first, s_total, w_first, w_total = [], [], [], []
    for _ in range(runs):
        a, b = streamed(engine, frames)
        s_first.append(a), s_total.append(b)
        a, b = whole_file(engine, frames)
        w_first.append(a), w_total.append(b)
    sf, st, wf, wt = map(median, (s_first, s_total, w_first, w_total))
    print(f"\n{name}: {frames} frames ({frames * 0.08:.1f} s of audio), median of {runs} runs")
    print(table(["path", "first audio (s)", "total (s)", "first audio vs whole-file"],
                [["whole-file (baseline)", wf, wt, 1.0], ["streamed (ours)", sf, st, wf / sf]]))
    costs = mimi_costs(engine.model.codec_model, frames)
    base = costs["whole-file decode"]
    print(table(["Mimi decode", "ms per frame", "cost vs whole-file"],
                [[k, 1000 * v, v / base] for k, v in costs.items()]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tiny-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(f"machine: {machine()}")
    run("tiny random CSM", tiny_engine(), max(args.frames, 50), max(args.runs, 5))
    if not args.tiny_only:
        run("full-size random CSM", full_engine(), args.frames, args.runs)


if __name__ == "__main__":
    main()
