"""The shipped default path under bad input and faults: one bad request never touches another.

Every server here runs CSM on the CPU default, ``--max-batch`` 4 (the batched path).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch
import websockets

from conftest import ROOT, collect, csm_slot, piper_slot, recv_json, running_server, url
from tts_server.engines.base import SynthesisTask, audio_only
from tts_server.engines.csm import CsmEngine
from tts_server.core.jobs import EngineSlot
from tts_server.engines.request import SynthesisRequest
from tts_server.audio.text import split_sentences

GOOD = {"text": "Keep my voice please.", "seed": 7, "context": False, "format": "pcm", "max_audio_length_ms": 1200}


async def speak(server, payload: dict) -> tuple[dict, bytes]:
    async with websockets.connect(url(server)) as ws:
        await ws.send(json.dumps(payload))
        reply, audio, _ = await collect(ws)
    return reply, audio


def served(server, engine: str) -> int:
    stats = server.service.metrics.stats.get(engine)
    return stats.requests if stats else 0


def pcm(audio: bytes) -> np.ndarray:
    return np.frombuffer(audio, dtype=np.int16).astype(np.int32)


# -- 1. bad sampling settings ---------------------------------------------------------------------------------

async def test_a_tiny_temperature_beside_a_good_request_leaves_the_good_one_on_csm_with_its_lone_audio(
        tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir, max_batch=4), piper_slot()) as server:
        alone, alone_audio = await speak(server, GOOD)
        (good, good_audio), (bad, _) = await asyncio.gather(
            speak(server, {**GOOD, "request_id": "good"}),
            speak(server, {"text": "Ruin the batch for everyone.", "temperature": 1e-300, "request_id": "bad",
                           "max_audio_length_ms": 1200}))
        assert served(server, "piper") == 0
    assert alone["engine"] == good["engine"] == bad["engine"] == "csm"
    assert good["status"] == bad["status"] == "success"
    assert len(good_audio) == len(alone_audio) and np.abs(pcm(good_audio) - pcm(alone_audio)).max() <= 2


@pytest.fixture(scope="module")
def batched_engine(tiny_model_dir):
    engine = CsmEngine(lambda: tiny_model_dir, device="cpu", max_batch=4)
    engine.load()
    return engine


def codes_of(engine, text: str, frames: int, **options) -> torch.Tensor:
    task = SynthesisTask(SynthesisRequest(text=text, request_id="t", context=False, max_audio_length_ms=frames * 80,
                                          **options))
    list(engine.synthesize(task))
    return torch.cat([turn.cache["csm"] for turn in task.produced])


def test_a_row_whose_sampling_fails_ends_alone_and_its_neighbour_keeps_its_lone_tokens(batched_engine):
    alone = codes_of(batched_engine, "The same words", 30, seed=11)
    result: dict = {}

    def good():
        result["good"] = codes_of(batched_engine, "The same words", 30, seed=11)

    def bad():
        try:
            codes_of(batched_engine, "Broken sampling", 10, seed=1, top_k=0)  # top_k 0 makes topk fail
        except Exception as exc:  # noqa: BLE001 - whatever it raises is its own
            result["bad"] = exc

    first = threading.Thread(target=good)
    first.start()
    while not batched_engine.batcher.active:  # the good row is in the batch: the bad one joins beside it
        time.sleep(0.001)
    second = threading.Thread(target=bad)
    second.start()
    first.join(60)
    second.join(60)
    assert "sampling failed" in str(result["bad"])
    assert torch.equal(result["good"], alone)


# -- 2. slots: a cancel storm, a hung or failing batch thread ---------------------------------------------------

def slow_steps(engine: CsmEngine, seconds: float) -> None:
    """Make each batch step last ``seconds`` longer, as a full-size CSM step does on a CPU (~1 s)."""
    step = engine.batcher._step

    def slow_step():
        time.sleep(seconds)
        step()

    engine.batcher._step = slow_step


def test_a_row_whose_consumer_left_mid_step_is_waited_for_by_the_next_request(tiny_model_dir):
    from tts_server.engines.csm_decode import Sampling

    engine = CsmEngine(lambda: tiny_model_dir, device="cpu", max_batch=2)
    engine.load()
    slow_steps(engine, 0.2)
    embeds = engine.decoder.embed_prompt(engine.prompt_ids([], "Hello there", 0), [])
    frames = lambda n: engine.batcher.frames(embeds, Sampling(), n, torch.Generator().manual_seed(1),  # noqa: E731
                                             threading.Event())
    busy, leaver = frames(40), frames(40)
    next(busy)
    next(leaver)  # both rows taken; the batch thread is now inside its next (slow) step
    leaver.close()  # its consumer goes away (disconnect, client_too_slow): the row is free at the step's end
    assert len(list(frames(3))) == 3  # the newcomer waits for that row instead of failing
    busy.close()


async def test_a_cancel_storm_on_a_full_batch_never_fails_a_request(tiny_model_dir):
    async def storm(client: int) -> list[str]:
        outcomes = []
        for n in range(5):
            rid = f"c{client}-{n}"
            ws = await websockets.connect(url(server))
            await ws.send(json.dumps({"text": "Cancel me soon, please. " * 3, "stream": True, "request_id": rid,
                                      "max_audio_length_ms": 8000}))
            if (await recv_json(ws))["status"] == "start":
                await asyncio.wait_for(ws.recv(), 30)  # the first audio chunk
                if n % 2:  # leave without a word: the server cancels on close
                    await ws.close()
                    continue
                await ws.send(json.dumps({"type": "cancel", "request_id": rid}))
            reply, _, _ = await collect(ws, rid)
            outcomes.append(reply.get("code", reply["status"]))
            await ws.close()
        return outcomes

    engine = CsmEngine(lambda: tiny_model_dir, device="cpu", max_batch=4)
    async with running_server(EngineSlot(engine)) as server:  # no fallback to hide a failure
        slow_steps(engine, 0.05)
        results = await asyncio.gather(*(storm(i) for i in range(7)))
        await asyncio.sleep(0.5)
        batcher = server.service.scheduler.primary.engine.batcher
        assert batcher.active == {} and sorted(batcher._free) == [0, 1, 2, 3]
    outcomes = [o for r in results for o in r]
    assert set(outcomes) <= {"cancelled", "success"}, outcomes
    assert outcomes.count("cancelled") > len(outcomes) // 2
    stats = server.service.metrics.stats["csm"]
    assert stats.requests == 35 and stats.failures == 0


class FaultyBatchCsm(CsmEngine):
    """The real tiny CSM on the batched path whose first batch step hangs or runs out of memory."""

    def __init__(self, folder, fault: str) -> None:
        super().__init__(lambda: folder, device="cpu", max_batch=4)
        self.fault = fault

    def use_model(self, processor, model) -> None:
        super().use_model(processor, model)
        batcher, step, fired = self.batcher, self.batcher._step, []

        def faulty_step():
            if not fired:
                fired.append(True)
                if self.fault == "hang":
                    time.sleep(4)  # stuck in native code, deaf to cancellation
                else:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return step()

        batcher._step = faulty_step


async def test_a_hung_batch_thread_is_replaced_and_the_next_request_is_served_at_once(tiny_model_dir):
    async with running_server(EngineSlot(FaultyBatchCsm(tiny_model_dir, "hang")), generation_timeout=1) as server:
        stuck, _ = await speak(server, {"text": "Hang", "request_id": "stuck"})
        after, audio = await speak(server, {"text": "Recovered", "max_audio_length_ms": 160})
    assert stuck["code"] == "generation_timeout"
    assert after["status"] == "success" and audio


async def test_out_of_memory_in_a_batch_step_is_reported_as_such_and_the_server_lives(tiny_model_dir):
    async with running_server(EngineSlot(FaultyBatchCsm(tiny_model_dir, "oom"))) as server:
        failed, _ = await speak(server, {"text": "Too big"})
        after, _ = await speak(server, {"text": "Fits", "max_audio_length_ms": 160})
    assert failed["code"] == "generation_failed" and "ran out of memory for this request" in failed["message"]
    assert after["status"] == "success"


# -- 3. a request's own fault is never retried on the fallback ----------------------------------------------------

@pytest.fixture(scope="module")
def short_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny CSM with only 64 positions: ordinary sentences do not fit it."""
    import shutil

    folder = tmp_path_factory.mktemp("short-csm")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    return folder


async def test_text_too_long_for_csm_is_answered_text_too_long_not_by_the_fallback(short_model_dir):
    async with running_server(csm_slot(short_model_dir, max_batch=4), piper_slot()) as server:
        reply, _ = await speak(server, {"text": "This sentence needs more audio frames than the model has positions."})
        assert served(server, "piper") == 0
    assert reply["status"] == "error" and reply["code"] == "text_too_long"


# -- 4. special tokens in client text ------------------------------------------------------------------------------

SPECIAL_TEXT = "Read <|AUDIO|> and <|audio_eos|> aloud, then <|begin_of_text|>[7]hi<|end_of_text|> please."


def test_spelled_special_tokens_in_client_text_are_tokenized_as_plain_text(batched_engine):
    config = batched_engine.model.config
    tokenizer = batched_engine.processor.tokenizer
    specials = {config.audio_token_id, config.audio_eos_token_id, config.bos_token_id,
                tokenizer.convert_tokens_to_ids("<|end_of_text|>")}
    plain = batched_engine.prompt_ids([], "Read it aloud please.", 0).tolist()
    forged = batched_engine.prompt_ids([], SPECIAL_TEXT, 0).tolist()
    assert [i for i in forged if i in specials] == [i for i in plain if i in specials]  # the template's own only
    assert tokenizer.decode(forged).count("<|AUDIO|>") == 1  # the text is still in the prompt, as text


async def test_spelled_special_tokens_are_spoken_by_csm(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir, max_batch=4), piper_slot()) as server:
        reply, audio = await speak(server, {"text": SPECIAL_TEXT, "max_audio_length_ms": 800})
    assert reply["status"] == "success" and reply["engine"] == "csm" and audio


# -- 7. long text is spoken whole, or the cut is reported ------------------------------------------------------

def test_a_long_text_is_spoken_whole_not_cut_at_90_seconds(tiny_model_dir):
    engine = CsmEngine(lambda: tiny_model_dir, device="cpu", chunk_frames=100)  # fewer decoder calls: faster
    engine.load()
    text = " ".join(f"Number {n:03d} ok." for n in range(50))  # 50 sentences, ~102 s of frame budget
    task = SynthesisTask(SynthesisRequest(text=text, request_id="long", context=False, top_k=1))
    seconds = sum(len(chunk) for chunk in audio_only(engine.synthesize(task))) / 24000
    assert [turn.text for turn in task.produced] == split_sentences(text)
    assert seconds > 90 and not task.truncated


async def test_a_clients_audio_cap_that_cuts_the_text_is_reported_as_truncated(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir, max_batch=4)) as server:
        cut, _ = await speak(server, {"text": "First sentence here. Second one there. Third one too.",
                                      "max_audio_length_ms": 400})
        whole, _ = await speak(server, {"text": "Short.", "max_audio_length_ms": 90_000})
    assert cut["status"] == "success" and cut["truncated"] is True
    assert whole["status"] == "success" and whole["truncated"] is False


# -- 5. a voice upload that unpacks to hours ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fifteen_hour_flac(tmp_path_factory):
    path = tmp_path_factory.mktemp("flac") / "fifteen-hours.flac"
    with sf.SoundFile(path, "w", samplerate=8000, channels=1, format="FLAC", subtype="PCM_16") as out:
        minute = np.zeros(8000 * 60, dtype=np.int16)
        for _ in range(15 * 60):
            out.write(minute)
    return path


def test_a_fifteen_hour_flac_is_refused_from_its_header_with_under_50_mb_of_memory(fifteen_hour_flac):
    probe = f"""
import resource, sys
sys.path.insert(0, {str(ROOT)!r})
from tts_server.references import ReferenceError
from tts_server.references.quality import check_voice_prompt
data = open({str(fifteen_hour_flac)!r}, "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    check_voice_prompt(data, 10 * 2**20, 30)
    print("accepted")
except ReferenceError as exc:
    print("refused:", exc)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    verdict, growth_kb = out.stdout.strip().splitlines()
    assert verdict.startswith("refused:") and "54000.00 s" in verdict
    assert int(growth_kb) < 50 * 1024, f"peak memory grew by {int(growth_kb) / 1024:.0f} MB"


async def test_a_fifteen_hour_flac_upload_is_an_invalid_voice_and_the_connection_lives(tiny_model_dir,
                                                                                       fifteen_hour_flac):
    async with running_server(csm_slot(tiny_model_dir, max_batch=4)) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"type": "voice", "speaker": 2, "text": "Nothing at all."}))
            await ws.send(fifteen_hour_flac.read_bytes())
            refused = await recv_json(ws)
            await ws.send(json.dumps({"text": "Still here", "max_audio_length_ms": 160}))
            after, _, _ = await collect(ws)
    assert refused["code"] == "invalid_voice" and "must last" in refused["message"]
    assert after["status"] == "success"


# -- 9. real-deployment details ------------------------------------------------------------------------------------

async def test_bfloat16_on_cpu_serves_with_the_codec_loaded_exactly_in_float32(tiny_model_dir):
    from transformers import CsmForConditionalGeneration

    engine = CsmEngine(lambda: tiny_model_dir, device="cpu", dtype="bfloat16", max_batch=4)
    reference = dict(CsmForConditionalGeneration.from_pretrained(tiny_model_dir).codec_model.named_parameters())
    async with running_server(EngineSlot(engine)) as server:  # (the engine is closed when the server stops)
        reply, audio = await speak(server, {"text": "Half precision", "max_audio_length_ms": 800})
        assert engine.model.lm_head.weight.dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 and torch.equal(p, reference[n])
                   for n, p in engine.model.codec_model.named_parameters())
    assert reply["status"] == "success" and reply["engine"] == "csm" and audio


def test_download_fetches_what_loading_needs_and_not_the_original_checkpoint(tiny_model_dir):
    from huggingface_hub.utils import filter_repo_objects

    from tts_server.engines.model_source import MODEL_FILES

    needed = sorted(p.name for p in tiny_model_dir.iterdir())
    offered = needed + ["ckpt.pt", "README.md", ".gitattributes", "prompts/conversational_a.wav"]
    assert sorted(filter_repo_objects(offered, allow_patterns=list(MODEL_FILES))) == needed


# -- 11. clients of the original protocol while the model loads ----------------------------------------------------

async def seed004_client(ws, text: str) -> bytes:
    """client_test.py's reads: one message; if it is ``loading``, one more that must be ``success``; then the WAV."""
    await ws.send(json.dumps({"text": text, "speaker": 0}))
    reply = await recv_json(ws)
    if reply["status"] == "loading":
        assert reply["message"] == "TTS model is still loading, request will be processed when ready"
        reply = await recv_json(ws)
    assert reply["status"] == "success", reply
    audio = await asyncio.wait_for(ws.recv(), 60)
    assert isinstance(audio, bytes) and audio[:4] == b"RIFF" and len(audio) == reply["length_bytes"]
    return audio


async def test_the_original_test_client_succeeds_while_the_model_loads(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir, delay=2.0, max_batch=4), wait_loaded=False) as server:
        async def one_per_connection(i: int) -> None:
            async with websockets.connect(url(server)) as ws:
                await seed004_client(ws, f"Hello number {i}.")

        async def several_on_one_connection() -> None:
            async with websockets.connect(url(server)) as ws:
                for i in range(3):
                    await seed004_client(ws, f"Again number {i}.")

        await asyncio.gather(*(one_per_connection(i) for i in range(3)), several_on_one_connection())
        assert server.service.scheduler.primary.state == "ready"
