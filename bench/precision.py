"""CSM at reduced precision: fidelity against float32, speed per frame, 4 streams, first audio, memory.

One process, one full-size random CSM (CSM-1B's shape; ``--model-path`` loads
a real checkpoint instead, e.g. the downloaded CSM-1B, CPU or ``--device cuda``).
The float32 model is the baseline; each variant is a copy of it:

- ``bfloat16``: the whole model (the Mimi codec stays float32);
- ``int8``: ``--quantize int8`` (int8 weights, bfloat16 activations: what ``--dtype auto`` gives it).

Fidelity, teacher-forced: float32 generates FRAMES frames (seeded sampling);
every variant then runs the same prompt and is fed float32's tokens, and its
logits at each step are compared with float32's: codebook 0 (the backbone's
head, one per frame) and codebooks 1-31 (the depth decoder, 31 per frame):
mean and worst cosine similarity, mean relative L2 error, and top-1 agreement.

    python bench/precision.py [--frames 25] [--speed-frames 6] [--no-server] [--model-path DIR --device cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import time

import torch
import websockets
from torch.nn import functional as F

from _common import machine, median, table
from decode_loop import concurrency
from models import full_engine
from tts_server.engines.csm import CsmEngine
from tts_server.engines.csm_decode import Sampling
from tts_server.engines.fidelity import logits_along
from tts_server.engines.quantize import Int8Linear
from tts_server.core.jobs import EngineSlot
from tts_server.api.server import TTSServer

PROMPT = "The quick brown fox jumps over the lazy dog, and then it takes a nap."


def fidelity(reference: list[torch.Tensor], other: list[torch.Tensor], codebooks: int) -> dict[str, list[float]]:
    rows: dict[str, list[float]] = {}
    for part, keep in (("codebook 0", lambda i: i % codebooks == 0), ("codebooks 1-31", lambda i: i % codebooks)):
        pairs = [(a, b) for i, (a, b) in enumerate(zip(reference, other)) if keep(i)]
        cos = [float(F.cosine_similarity(a, b, dim=0)) for a, b in pairs]
        rel = [float((a - b).norm() / a.norm()) for a, b in pairs]
        top1 = [float(a.argmax() == b.argmax()) for a, b in pairs]
        rows[part] = [sum(cos) / len(cos), min(cos), 100 * sum(rel) / len(rel), 100 * sum(top1) / len(top1)]
    return rows


def per_frame(engine, frames: int) -> float:
    """Median seconds per frame at batch 1 (the first frame, with its prefill, left out)."""
    decoder = engine.decoder
    embeds = decoder.embed_prompt(engine.prompt_ids([], PROMPT, 0), [])
    rng = torch.Generator(device=decoder.device).manual_seed(1)
    times, last = [], None
    for _ in decoder.frames(embeds, Sampling(), frames + 1, rng):
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
    return median(times)


async def first_audio(engine, runs: int) -> float:
    """Median time to the first audio byte of a lone streamed request through the real server."""
    slot = EngineSlot(engine)
    slot.state, slot.reason = "ready", "ready"
    slot.loaded.set()
    server = TTSServer(slot, host="127.0.0.1", port=0)
    await server.start()
    times = []
    try:
        for _ in range(runs):
            async with websockets.connect(f"ws://127.0.0.1:{server.port}") as ws:
                started = time.perf_counter()
                await ws.send(json.dumps({"text": PROMPT, "stream": True, "format": "pcm", "context": False,
                                          "max_audio_length_ms": 240, "seed": 1}))
                while not isinstance(await ws.recv(), bytes):
                    pass
                times.append(time.perf_counter() - started)
                while not (isinstance(f := await ws.recv(), str) and json.loads(f)["status"] == "success"):
                    pass
    finally:
        await server.stop()
    return median(times)


def model_bytes(engine) -> int:
    model = engine.model
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    int8 = [m.weight for m in model.modules() if isinstance(m, Int8Linear)] + getattr(model, "int8_depth_heads", [])
    return total + sum(w.nbytes() for w in int8)


def variant(base: CsmEngine, dtype: str, quantize: str) -> CsmEngine:
    engine = CsmEngine(lambda: None, device=base.device, dtype=dtype, quantize=quantize, max_batch=4,
                       label=base.label)
    started = time.perf_counter()
    model = copy.deepcopy(base.model)
    for name, child in model.named_children():
        if name != "codec_model":  # the codec stays float32, as the server loads it
            child.to(engine.dtype)
    engine.use_model(base.processor, model)
    print(f"{dtype}/{quantize}: prepared in {time.perf_counter() - started:.1f} s")
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=25, help="teacher-forced frames for fidelity")
    parser.add_argument("--speed-frames", type=int, default=6, help="frames timed per variant at batch 1")
    parser.add_argument("--stream-frames", type=int, default=6, help="frames per stream at 4 streams (0: skip)")
    parser.add_argument("--no-server", action="store_true", help="skip time to first audio through the server")
    parser.add_argument("--model-path", help="a real CSM checkpoint folder instead of the random full-size model")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.model_path:
        base = CsmEngine(lambda: args.model_path, device=args.device, dtype="float32", max_batch=4)
        base.load()
    else:
        base = full_engine(dtype="float32", max_batch=4)
    frames, reference = logits_along(base, PROMPT, args.frames)
    codebooks = base.decoder.num_codebooks
    plans = [("float32", "float32", "none"), ("bfloat16", "bfloat16", "none"), ("int8", "bfloat16", "int8")]
    fid, speed = [], []
    for name, dtype, quantize in plans:
        engine = base if name == "float32" else variant(base, dtype, quantize)
        if name != "float32":
            _, logits = logits_along(engine, PROMPT, args.frames, frames)
            for part, row in fidelity(reference, logits, codebooks).items():
                fid.append([name, engine.precision(), part, *row])
        frame_s = per_frame(engine, args.speed_frames)
        streams = concurrency(engine, 4, args.stream_frames, 4)[1] if args.stream_frames else float("nan")
        ttfa = float("nan") if args.no_server else asyncio.run(first_audio(engine, 3))
        speed.append([name, frame_s, streams, ttfa, model_bytes(engine) / 1e9])
        if engine is not base:
            del engine
    base_frame, base_streams, base_ttfa = speed[0][1], speed[0][2], speed[0][3]
    print(f"{machine()}; {base.label}; {args.frames} teacher-forced frames")
    print(table(["variant", "precision", "logits", "mean cosine", "worst cosine", "rel. L2 error (%)",
                 "top-1 agreement (%)"], fid))
    print(table(["variant", "s per frame (batch 1)", "speed-up", "frames/s, 4 streams", "speed-up",
                 "first audio, lone stream (s)", "ratio", "model in memory (GB)"],
                [[n, f, base_frame / f, s, s / base_streams, t, t / base_ttfa, gb] for n, f, s, t, gb in speed]))


if __name__ == "__main__":
    main()
