"""Random-weight CSM engines for benchmarks: tiny (from a saved checkpoint) or full-size (built in memory)."""

from __future__ import annotations

import tempfile
import time

import torch

from tts_server.engines.csm import CsmEngine
from tts_server.engines.tiny_csm import CHAT_TEMPLATE, build_checkpoint, build_config, build_tokenizer, randomize_codebooks


def tiny_engine(**options) -> CsmEngine:
    folder = build_checkpoint(tempfile.mkdtemp(prefix="bench-tiny-"))
    engine = CsmEngine(lambda: folder, device="cpu", **options)
    engine.load()
    return engine


def full_engine(**options) -> CsmEngine:
    """CSM-1B's shape (1.6 B parameters) with random weights; ~45 s to build on 2 cores."""
    from transformers import CsmForConditionalGeneration, CsmProcessor, EncodecFeatureExtractor

    started = time.perf_counter()
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = CsmForConditionalGeneration(build_config(tokenizer, "full"))
    randomize_codebooks(model.codec_model)
    processor = CsmProcessor(EncodecFeatureExtractor(feature_size=1, sampling_rate=24000), tokenizer,
                             chat_template=CHAT_TEMPLATE)
    engine = CsmEngine(lambda: None, device="cpu", label="random full-size CSM", **options)
    engine.use_model(processor, model.to(engine.dtype))  # the codec goes back to float32 there
    print(f"built full-size random CSM in {time.perf_counter() - started:.0f} s")
    return engine
