"""``--quantize int8`` on the tiny CSM: it loads like a user's server, is deterministic, batches exactly, stays close."""

from __future__ import annotations

import json

import pytest
import torch
import websockets
from torch.nn import functional as F

from audio_fixtures import speechlike, write_audio
from conftest import ServerProcess, ahttp_get, codes_beside_neighbours, codes_of, collect
from tts_server.engines.csm import CsmEngine
from tts_server.engines.fidelity import logits_along
from tts_server.engines.quantize import Int8Linear, Int8Weight, int8_linear

TEXT = "Compare these logits please."
ACTIVATIONS = ["bfloat16", "float32"]  # int8 weights with either (bfloat16 is what --dtype auto gives int8)


def engine_for(folder, dtype: str, max_batch: int, quantize: str = "int8") -> CsmEngine:
    engine = CsmEngine(lambda: folder, device="cpu", dtype=dtype, max_batch=max_batch, quantize=quantize)
    engine.load()
    return engine


def test_every_projection_is_int8_and_the_float_weights_are_gone(tiny_model_dir):
    engine = engine_for(tiny_model_dir, "bfloat16", 1)
    model = engine.model
    assert engine.precision() == "int8 weights, bfloat16 activations"
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and not name.startswith("codec_model")] == []  # the codec keeps its own layers
    assert linears and all(m.weight.dtype == torch.float32 for m in linears)  # codec only
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    per_layer = 7 * (model.config.num_hidden_layers + model.config.depth_decoder_config.num_hidden_layers)
    assert len(int8) == per_layer + 2  # + lm_head and the depth decoder's input projector
    assert len(model.int8_depth_heads) == model.config.num_codebooks - 1
    assert model.depth_decoder.codebooks_head.weight.numel() == 0


@pytest.mark.parametrize("activations", ACTIVATIONS)
def test_a_seeded_int8_request_is_deterministic_and_the_same_alone_at_batch_1_or_beside_others(tiny_model_dir,
                                                                                                 activations):
    single = engine_for(tiny_model_dir, activations, 1)
    batched = engine_for(tiny_model_dir, activations, 4)
    alone = codes_of(single, "The same words", seed=11, frames=20)
    assert torch.equal(codes_of(single, "The same words", seed=11, frames=20), alone)
    results = codes_beside_neighbours(batched, "The same words", seed=11, frames=20)
    assert batched.batcher.steps > 0
    assert torch.equal(results["The same words"], alone)
    assert len({tuple(t[0].tolist()) for t in results.values()}) == 4  # the neighbours really differed


@pytest.mark.parametrize("activations", ACTIVATIONS)
def test_int8_logits_stay_close_to_float32_under_teacher_forcing(tiny_model_dir, activations):
    """Fed float32's tokens, int8's logits at every codebook step stay close (full-size figures: docs/benchmarks.md)."""
    reference = engine_for(tiny_model_dir, "float32", 1, quantize="none")
    frames, expected = logits_along(reference, TEXT, 12)
    _, got = logits_along(engine_for(tiny_model_dir, activations, 1), TEXT, 12, frames)
    cosine = torch.stack([F.cosine_similarity(a, b, dim=0) for a, b in zip(expected, got)])
    top1 = torch.tensor([float(a.argmax() == b.argmax()) for a, b in zip(expected, got)])
    assert cosine.mean() > 0.99 and cosine.min() > 0.95 and top1.mean() > 0.85, (cosine, top1.mean())
    # and far closer than an unrelated model's logits would be: the int8 model is the same model
    shuffled = torch.stack([F.cosine_similarity(a, b, dim=0) for a, b in zip(expected, got[1:])])
    assert cosine.mean() > shuffled.mean() + 0.1


@pytest.mark.parametrize("activations", ACTIVATIONS)
def test_int8_linear_matches_float_linear_within_quantization_error(activations):
    torch.manual_seed(0)
    dtype = getattr(torch, activations)
    weight, x = torch.randn(256, 512) * 0.05, torch.randn(3, 5, 512)
    got = int8_linear(x.to(dtype), Int8Weight.of(weight))
    want = F.linear(x, weight)
    assert got.shape == want.shape and got.dtype == dtype
    assert float((got.float() - want).norm() / want.norm()) < 0.015
    # a row's numbers do not depend on the other rows (batch neighbours)
    loud = x.clone()
    loud[1:] *= 50
    assert torch.equal(int8_linear(loud.to(dtype), Int8Weight.of(weight))[0], got[0])


async def test_int8_server_from_reuse_mode_streams_with_emotions_on_the_default_batch(tiny_model_dir, tmp_path):
    refs = tmp_path / "refs"
    refs.mkdir()
    write_audio(refs / "happy.wav", speechlike(1.0))
    (refs / "emotion_map.json").write_text('{"happy": [{"path": "happy.wav", "text": "Yay!"}]}')
    server = ServerProcess(tmp_path, ["--mode", "reuse", "--model-path", str(tiny_model_dir), "--engine", "csm",
                                      "--quantize", "int8", "--references", str(refs)])
    try:
        server.wait_for_log("Engines: serving")
        status, body = await ahttp_get(server.port, "/v1/info")
        async with websockets.connect(f"ws://127.0.0.1:{server.port}") as ws:
            replies = []
            for _ in range(2):
                await ws.send(json.dumps({"text": "Quantized and happy.", "emotion": "happy", "stream": True,
                                          "seed": 4, "context": False, "max_audio_length_ms": 640}))
                replies.append(await collect(ws))
    finally:
        log = server.stop()
    csm = json.loads(body)["engines"]["csm"]
    assert status == 200 and csm["precision"] == "int8 weights, bfloat16 activations" and csm["max_batch"] == 4
    assert "quantized to int8" in log and "computing in int8 weights, bfloat16 activations" in log
    (first, audio, _), (second, again, _) = replies
    assert first["status"] == second["status"] == "success" and first["chunks"] > 1
    assert len(audio) == 640 * 24 * 2 and audio == again  # deterministic for its seed, through the server
