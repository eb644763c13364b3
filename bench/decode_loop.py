"""CSM decode speed: transformers' generate vs our loop, and continuous batching vs one-after-another.

1. Per-frame cost at batch 1: ``model.generate`` vs ``CsmDecoder.frames`` (our loop) on the same prompt,
   alternating, medians of --runs.  Tiny random CSM always; full-size random CSM unless --tiny-only.
2. Concurrency (full-size unless --tiny-only, then tiny): N streams of --frames frames each, run one after
   another through the sequential loop vs together through the ``Batcher`` (max(N, --rows) rows, as a server
   with ``--max-batch`` --rows runs them): aggregate frames per second and each stream's time to first frame.

    python bench/decode_loop.py [--runs 3] [--frames 25] [--streams 1,2,4,8] [--rows 4] [--tiny-only]
        [--concurrency-only]
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from _common import machine, median, table
from models import full_engine, tiny_engine
from tts_server.engines.csm_batch import Batcher
from tts_server.engines.csm_decode import Sampling


def _rng(decoder, seed: int) -> torch.Generator:
    return torch.Generator(device=decoder.device).manual_seed(seed)


def per_frame(engine, frames: int, runs: int) -> tuple[float, float]:
    model, decoder = engine.model, engine.decoder
    ids = engine.prompt_ids([], "Measuring the decode loop.", 0)
    embeds = decoder.embed_prompt(ids, [])
    inputs = {"input_ids": ids[None].to(decoder.device), "attention_mask": torch.ones_like(ids)[None].to(decoder.device)}
    suppress = list(range(decoder.codec_size, model.config.vocab_size))
    options = dict(do_sample=True, temperature=0.9, top_k=50, depth_decoder_do_sample=True,
                   depth_decoder_temperature=0.9, depth_decoder_top_k=50,
                   suppress_tokens=suppress, depth_decoder_suppress_tokens=suppress)

    def theirs() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=frames, **options)
        return (time.perf_counter() - started) / frames

    def ours() -> float:
        started = time.perf_counter()
        list(decoder.frames(embeds, Sampling(), frames, _rng(decoder, 0)))
        return (time.perf_counter() - started) / frames

    theirs(), ours()  # warm-up
    a, b = [], []
    for _ in range(runs):
        a.append(theirs())
        b.append(ours())
    return median(a), median(b)


def concurrency(engine, streams: int, frames: int, rows: int) -> tuple[float, float, float, float]:
    """(sequential frames/s, batched frames/s, sequential mean first-frame s, batched mean first-frame s)."""
    decoder = engine.decoder
    prompts = [decoder.embed_prompt(engine.prompt_ids([], f"Stream number {i} is talking.", 0), [])
               for i in range(streams)]
    firsts: list[float] = []
    started = time.perf_counter()
    for embeds in prompts:
        for n, _ in enumerate(decoder.frames(embeds, Sampling(), frames, _rng(decoder, 1))):
            if n == 0:
                firsts.append(time.perf_counter() - started)
    sequential = time.perf_counter() - started
    batcher = Batcher(decoder, rows)
    list(batcher.frames(prompts[0], Sampling(), 2, _rng(decoder, 1), threading.Event()))  # warm-up: thread, cache
    batch_firsts: list[float] = []

    def run(embeds) -> None:
        for n, _ in enumerate(batcher.frames(embeds, Sampling(), frames, _rng(decoder, 1),
                                             threading.Event())):
            if n == 0:
                batch_firsts.append(time.perf_counter() - started)

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(embeds,)) for embeds in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    batched = time.perf_counter() - started
    total = streams * frames
    return total / sequential, total / batched, sum(firsts) / streams, sum(batch_firsts) / streams


def concurrency_table(engine, streams: str, frames: int, min_rows: int) -> str:
    """``concurrency`` for each of the comma-separated ``streams`` counts, as a table."""
    rows = []
    for count in (int(s) for s in streams.split(",")):
        batch_rows = max(count, min_rows)
        seq, bat, seq_first, bat_first = concurrency(engine, count, frames, batch_rows)
        rows.append([count, batch_rows, seq, bat, bat / seq, seq_first, bat_first])
    return table(["streams", "batch rows", "one-after-another frames/s", "batched frames/s", "speed-up",
                  "mean first frame, one after another (s)", "mean first frame, batched (s)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--frames", type=int, default=25, help="frames per stream (25 = 2 s of audio)")
    parser.add_argument("--streams", default="1,2,4,8")
    parser.add_argument("--rows", type=int, default=4, help="batch rows at least (the server's CPU default)")
    parser.add_argument("--tiny-only", action="store_true")
    parser.add_argument("--concurrency-only", action="store_true", help="skip the per-frame table")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    big = None if args.tiny_only else full_engine()
    if not args.concurrency_only:
        tiny = tiny_engine()
        a, b = per_frame(tiny, 40, max(args.runs, 7))
        rows = [["tiny random CSM", 1000 * a, 1000 * b, a / b]]
        if big is not None:
            a, b = per_frame(big, args.frames, args.runs)
            rows.append(["full-size random CSM", 1000 * a, 1000 * b, a / b])
        print("\nPer frame at batch 1 (medians):")
        print(table(["model", "generate (ms/frame)", "our loop (ms/frame)", "speed-up"], rows))
    engine = big or tiny_engine()
    name = "full-size" if big is not None else "tiny"
    print(f"\nConcurrency, {name} random CSM, {args.frames} frames per stream (one run each):")
    print(concurrency_table(engine, args.streams, args.frames, args.rows))


if __name__ == "__main__":
    main()
