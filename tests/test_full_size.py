"""Slower checks of the decode loop: CSM-1B's real shape, and the ``--compile`` path.

The full-size test builds the 1.6 B-parameter model in memory (~40 s, ~7 GB) and decodes 3 frames; the compile
test compiles the depth step with torch.compile on the CPU (~30 s).
"""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import ROOT
from tts_server.engines.csm_decode import Sampling

sys.path.insert(0, str(ROOT / "bench"))
from models import full_engine  # noqa: E402


@pytest.mark.slow
def test_full_size_greedy_tokens_equal_model_generate():
    engine = full_engine()
    model, decoder = engine.model, engine.decoder
    ids = engine.prompt_ids([], "Full size check.", 0)
    suppress = list(range(decoder.codec_size, model.config.vocab_size))
    with torch.inference_mode():
        expected = model.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], max_new_tokens=3,
                                  do_sample=False, depth_decoder_do_sample=False, suppress_tokens=suppress,
                                  depth_decoder_suppress_tokens=suppress)[0]
    ours = torch.stack(list(decoder.frames(decoder.embed_prompt(ids, []), Sampling(top_k=1), 3)))
    assert ours.shape == expected.shape == (3, 32)
    assert torch.equal(ours, expected)


@pytest.mark.slow
def test_compiled_depth_step_gives_the_same_tokens(tiny_model_dir):
    from tts_server.engines.csm import CsmEngine

    plain = CsmEngine(lambda: tiny_model_dir, device="cpu")
    compiled = CsmEngine(lambda: tiny_model_dir, device="cpu", compile=True)
    plain.load()
    compiled.load()
    for engine in (plain, compiled):
        embeds = engine.decoder.embed_prompt(engine.prompt_ids([], "Compile me", 0), [])
        engine.codes = torch.stack(list(engine.decoder.frames(embeds, Sampling(temperature=0.8, top_k=20), 6,
                                                              torch.Generator().manual_seed(4))))
    assert torch.equal(plain.codes, compiled.codes)
