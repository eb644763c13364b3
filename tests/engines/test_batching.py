"""Continuous batching: concurrent CSM requests share one batch, exactly and without starving anyone."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import torch
import websockets
from torch.nn import functional as F
from transformers import AutoProcessor, CsmForConditionalGeneration

from conftest import codes_beside_neighbours, codes_of, collect, recv_json, running_server, url
from tts_server.engines.csm import CsmEngine
from tts_server.engines.csm_decode import Sampling, skinny_linear
from tts_server.core.jobs import EngineSlot


@pytest.fixture(scope="module")
def batched_engine(tiny_model_dir):
    engine = CsmEngine(lambda: tiny_model_dir, device="cpu", max_batch=4)
    engine.load()
    return engine


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_batched_path_gives_the_tokens_of_model_generate(tiny_model_dir, batched_engine, greedy):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = CsmForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    inputs = processor.apply_chat_template([{"role": "0", "content": [{"type": "text", "text": "Batch me"}]}],
                                           tokenize=True, return_dict=True)
    ids = list(range(model.config.codec_config.codebook_size, model.config.vocab_size))
    options = (dict(do_sample=False, depth_decoder_do_sample=False) if greedy else
               dict(do_sample=True, top_k=50, temperature=0.9, depth_decoder_do_sample=True,
                    depth_decoder_top_k=50, depth_decoder_temperature=0.9))
    torch.manual_seed(3)
    expected = model.generate(**inputs, max_new_tokens=16, suppress_tokens=ids, depth_decoder_suppress_tokens=ids,
                              **options)[0]
    ours = codes_of(batched_engine, "Batch me", seed=3, frames=16, top_k=1 if greedy else 50)
    assert batched_engine.batcher.steps > 0  # frames 2..16 really came from the batch
    assert torch.equal(ours, expected)


def test_a_seeded_request_is_the_same_alone_or_beside_others(batched_engine):
    alone = codes_of(batched_engine, "The same words", seed=11, frames=24)
    results = codes_beside_neighbours(batched_engine, "The same words", seed=11, frames=24)
    assert torch.equal(results["The same words"], alone)
    assert len({tuple(t[0].tolist()) for t in results.values()}) == 4  # neighbours really differed


def test_a_request_joining_a_running_batch_gets_the_tokens_it_gets_alone(batched_engine):
    decoder, batcher = batched_engine.decoder, batched_engine.batcher

    def frames(text: str, seed: int, count: int):
        embeds = decoder.embed_prompt(batched_engine.prompt_ids([], text, 0), [])
        return batcher.frames(embeds, Sampling(), count, torch.Generator().manual_seed(seed), threading.Event())

    alone = torch.stack(list(frames("Late joiner", 5, 40)))  # 40 frames: enough for a corrupted cache to show
    neighbour = frames("Early bird", 1, 100)
    next(neighbour), next(neighbour)  # the neighbour is in the batch, stepping
    steps = batcher.steps
    joined = torch.stack(list(frames("Late joiner", 5, 40)))  # prefilled and admitted between its steps
    assert len(list(neighbour)) == 98 and batcher.steps >= steps + 40  # it really ran beside the joiner
    assert torch.equal(joined, alone)


def test_skinny_linear_equals_linear_to_float_rounding():
    torch.manual_seed(0)
    weight = torch.randn(96, 64)
    for rows in (1, 2, 3, 4, 8):
        x = torch.randn(rows, 1, 64)
        assert skinny_linear(x, weight).shape == (rows, 1, 96)
        torch.testing.assert_close(skinny_linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(skinny_linear(x, weight.T.contiguous().T), F.linear(x, weight))  # a view


async def test_concurrent_streams_interleave_and_cancelled_rows_leave(tiny_model_dir):
    engine = CsmEngine(lambda: tiny_model_dir, device="cpu", max_batch=4)
    async with running_server(EngineSlot(engine)) as server:
        clients = [await websockets.connect(url(server)) for _ in range(4)]
        for i, ws in enumerate(clients):
            await ws.send(json.dumps({"text": f"Stream number {i} talks for a while.", "stream": True,
                                      "max_audio_length_ms": 2400, "request_id": f"s{i}", "seed": i}))
        for ws in clients:
            assert (await recv_json(ws))["status"] == "start"
            assert isinstance(await asyncio.wait_for(ws.recv(), 30), bytes)
        # All four have audio before any has finished: none waits for another to end.
        assert len(server.service.scheduler.running) == 4 and len(engine.batcher.active) >= 3
        await clients[0].send(json.dumps({"type": "cancel", "request_id": "s0"}))
        reply, _, _ = await collect(clients[0], "s0")
        assert reply["status"] == "cancelled"
        results = [await collect(ws, f"s{i}") for i, ws in enumerate(clients[1:], start=1)]
        assert all(r[0]["status"] == "success" and r[0]["duration_s"] == pytest.approx(2.4) for r in results)
        for ws in clients:
            await ws.close()
        await asyncio.sleep(0.2)
        assert engine.batcher.active == {} and sorted(engine.batcher._free) == [0, 1, 2, 3]
