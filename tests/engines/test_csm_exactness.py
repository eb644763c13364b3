"""Our CSM path against transformers' reference on the same weights and seed.

Prompt building, the decode loop and the audio a client receives must equal
what ``processor.apply_chat_template`` + ``model.generate`` + the codec give.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import websockets
from transformers import AutoProcessor, CsmForConditionalGeneration

from conftest import collect, csm_slot, read_wav, running_server, url
from tts_server.audio.codec import to_int16
from tts_server.engines.base import ContextTurn
from tts_server.engines.csm import CsmEngine
from tts_server.engines.csm_decode import Sampling


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = CsmForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    return processor, model


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = CsmEngine(lambda: tiny_model_dir, device="cpu")
    engine.load()
    return engine


def _context_conversation():
    rng = np.random.RandomState(7)
    clip_a = (rng.randn(24000) * 0.1).astype(np.float32)
    clip_b = (rng.randn(36000) * 0.1).astype(np.float32)
    conversation = [
        {"role": "0", "content": [{"type": "text", "text": "Hi there."}, {"type": "audio", "audio": clip_a}]},
        {"role": "1", "content": [{"type": "text", "text": "Oh, hello!"}, {"type": "audio", "audio": clip_b}]},
        {"role": "0", "content": [{"type": "text", "text": "How are you today?"}]},
    ]
    return conversation, [clip_a, clip_b]


def _suppressed(model):
    """Ids our loop never samples (the codec cannot decode them), as generate() arguments."""
    ids = list(range(model.config.codec_config.codebook_size, model.config.vocab_size))
    return {"suppress_tokens": ids, "depth_decoder_suppress_tokens": ids}


def test_prompt_ids_and_embeddings_equal_the_processor_path(reference, engine):
    processor, model = reference
    conversation, clips = _context_conversation()
    inputs = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    decoder = engine.decoder
    codes = [decoder.encode_audio(torch.from_numpy(c)) for c in clips]
    turns = [ContextTurn(0, "Hi there.", cache={"csm": codes[0]}), ContextTurn(1, "Oh, hello!", cache={"csm": codes[1]})]
    ids = engine.prompt_ids(turns, "How are you today?", 0)
    assert torch.equal(ids, inputs["input_ids"][0])
    ours = decoder.embed_prompt(ids, codes)
    theirs = model._merge_input_ids_with_input_values(
        inputs["input_ids"], inputs["input_values"], inputs["input_values_cutoffs"])["inputs_embeds"][0]
    assert torch.equal(ours, theirs)


def test_prompt_layout_is_bos_speaker_text_eos_then_audio_slots(engine):
    tok = engine.processor.tokenizer
    turns = [ContextTurn(3, "Yes.", cache={"csm": torch.zeros(2, 32, dtype=torch.long)})]
    ids = engine.prompt_ids(turns, "No.", 5)
    text = tok.decode(ids)
    assert text == ("<|begin_of_text|>[3]Yes.<|end_of_text|><|AUDIO|><|AUDIO|><|audio_eos|>"
                    "<|begin_of_text|>[5]No.<|end_of_text|>")


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_decode_loop_tokens_equal_model_generate(reference, engine, greedy):
    processor, model = reference
    conversation, clips = _context_conversation()
    inputs = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    decoder = engine.decoder
    embeds = decoder.embed_prompt(inputs["input_ids"][0], [decoder.encode_audio(torch.from_numpy(c)) for c in clips])
    frames = 12
    for seed in (0, 1):
        if greedy:
            kwargs = dict(do_sample=False, depth_decoder_do_sample=False)
            sampling = Sampling(top_k=1)
        else:
            kwargs = dict(do_sample=True, temperature=0.7, top_k=20, depth_decoder_do_sample=True,
                          depth_decoder_temperature=0.7, depth_decoder_top_k=20)
            sampling = Sampling(temperature=0.7, top_k=20)
        torch.manual_seed(seed)
        expected = model.generate(**inputs, max_new_tokens=frames, **kwargs, **_suppressed(model))[0]
        rng = torch.Generator().manual_seed(seed)
        ours = torch.stack(list(decoder.frames(embeds, sampling, frames, rng)))
        assert ours.shape == expected.shape == (frames, 32)
        assert torch.equal(ours, expected)


def test_codebook_ids_outside_the_codec_never_reach_it(engine):
    decoder = engine.decoder
    ids = engine.prompt_ids([], "Loud random noise, please.", 0)
    embeds = decoder.embed_prompt(ids, [])
    rng = torch.Generator().manual_seed(3)
    codes = torch.stack(list(decoder.frames(embeds, Sampling(temperature=2.0, top_k=10_000), 40, rng)))
    assert int(codes.max()) < decoder.codec_size < engine.model.config.vocab_size


async def test_server_audio_equals_generate_tokens_decoded_by_the_codec(reference, tiny_model_dir):
    processor, model = reference
    text = "Greedy and exact"
    conversation = [{"role": "2", "content": [{"type": "text", "text": text}]}]
    inputs = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    frames = 10
    tokens = model.generate(**inputs, max_new_tokens=frames, do_sample=False, depth_decoder_do_sample=False,
                            **_suppressed(model))[0]
    expected = model.codec_model.decode(tokens.transpose(0, 1)[None]).audio_values[0, 0].detach().numpy()
    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"text": text, "speaker": 2, "top_k": 1, "seed": 5,
                                      "max_audio_length_ms": frames * 80, "context": False}))
            reply, audio, _ = await collect(ws)
    assert reply["status"] == "success", reply
    samples, rate = read_wav(audio)
    assert rate == 24000 and len(samples) == frames * 1920
    # The streaming decoder sums the same terms in another order: equal up to float rounding (1 LSB).
    assert np.abs(samples.astype(np.int32) - to_int16(expected).astype(np.int32)).max() <= 1
