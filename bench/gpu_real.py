"""The decode-loop and batching benchmark on real CSM-1B weights, for a machine with a GPU (not run in CI).

    python bench/gpu_real.py --model-path ~/.cache/huggingface/hub/models--sesame--csm-1b [--device cuda]
        [--dtype auto] [--frames 50] [--runs 3] [--streams 1,2,4,8] [--rows 8]

Prints the same tables as bench/decode_loop.py: per-frame cost of transformers' generate vs our loop at batch 1,
and aggregate frames/s for N concurrent streams batched vs one after another. It runs on any device, so it can be
smoke-tested on a CPU with a tiny checkpoint (python -m tts_server.engines.tiny_csm DIR; --model-path DIR --device cpu).
"""

from __future__ import annotations

import argparse

import torch

from _common import machine, table
from decode_loop import concurrency_table, per_frame
from tts_server.engines.csm import CsmEngine
from tts_server.engines.model_source import resolve_local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--streams", default="1,2,4,8")
    parser.add_argument("--rows", type=int, default=8, help="batch rows at least (the server's CUDA default)")
    args = parser.parse_args()
    folder = resolve_local(args.model_path)
    engine = CsmEngine(lambda: folder, args.device, args.dtype)
    engine.load()
    gpu = torch.cuda.get_device_name() if engine.device == "cuda" else "no GPU"
    print(f"machine: {machine()}; device {engine.device} ({gpu}), dtype {engine.describe()['dtype']}")
    theirs, ours = per_frame(engine, args.frames, args.runs)
    print(table(["per frame at batch 1", "generate (ms)", "our loop (ms)", "speed-up"],
                [[str(folder.name), 1000 * theirs, 1000 * ours, theirs / ours]]))
    print(concurrency_table(engine, args.streams, args.frames, args.rows))


if __name__ == "__main__":
    main()
