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


@pytest.mark.slow
def test_compiled_depth_step_compiles_a_few_graphs_at_load_not_one_per_layer(tiny_model_dir, tmp_path):
    """CSM-1B's 4 depth layers x first/later steps once hit dynamo's recompile limit (8) and fell back to eager."""
    import json
    import shutil

    import torch._dynamo

    from tts_server.engines.base import SynthesisTask, audio_only
    from tts_server.engines.csm import CsmEngine
    from tts_server.engines.request import SynthesisRequest

    folder = tmp_path / "four-depth-layers"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["depth_decoder_config"]["num_hidden_layers"] = 4  # as CSM-1B
    (folder / "config.json").write_text(json.dumps(config))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=3, fail_on_recompile_limit_hit=True):
        engine = CsmEngine(lambda: folder, device="cpu", compile=True)
        engine.load()  # compiles here (warm-up), not in the first request
        compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        task = SynthesisTask(SynthesisRequest(text="After the warm-up", request_id="r", max_audio_length_ms=400))
        assert sum(len(chunk) for chunk in audio_only(engine.synthesize(task))) > 0
    assert 0 < compiled == torch._dynamo.utils.counters["stats"]["unique_graphs"]  # nothing new after load
