"""The decode loop on CSM-1B's real shape (random weights): token-exact against transformers' generate.

Slow-ish (~1 min, ~7 GB of memory): builds the full 1.6 B-parameter model in memory and decodes 3 frames.
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
