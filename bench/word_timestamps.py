"""Word timestamps: how close CSM's aligner gets to exact times, what it costs, and how late words arrive.

Piper gives exact word times (its phoneme alignments).  On the same Piper audio this times each word's start
three ways: Piper's own (the truth), our forced aligner (Whisper's cross-attention over the known text, what
CSM's words come from with --stt-model), and Whisper's own recognition with word timestamps (the baseline the
issue measured).  Then the aligner's cost per second of audio, and, on a server with tiny CSM, the time to the
first ``words`` message against the time to first audio.

    python bench/word_timestamps.py --stt-model DIR [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import websockets

from _common import machine, median, table
from tts_server.api.server import TTSServer
from tts_server.audio.codec import resample
from tts_server.audio.text import split_sentences
from tts_server.core.jobs import EngineSlot
from tts_server.engines.base import SentenceMark, SynthesisTask
from tts_server.engines.csm import CsmEngine
from tts_server.engines.piper import PiperEngine
from tts_server.engines.request import SynthesisRequest
from tts_server.engines.stt import ALIGN_LEAD_S, Transcriber
from tts_server.engines.tiny_csm import build_checkpoint

TEXTS = ["The quick brown fox jumps over the lazy dog, and then it runs into the forest.",
         "I have forty two apples, a well-known dog named Rex, and three old bicycles.",
         "Please remember to call your sister before the meeting starts on Thursday morning.",
         "She sells sea shells by the sea shore, while the children build castles of sand.",
         "Our new kitchen has a bright yellow door that opens onto a small garden."]


# a disjoint set: the aligner's constant lead (stt.ALIGN_LEAD_S) is measured on these, the errors on TEXTS
CALIBRATION = ["A gentle breeze moved through the tall grass as the sun went down behind the hills.",
               "My grandmother baked bread every Sunday and shared it with all of the neighbours.",
               "The train to the city leaves at seven, so we should pack our bags tonight.",
               "Scientists measured the temperature of the lake every hour for a whole year.",
               "Would you like coffee or tea with your breakfast this morning, or maybe juice?"]


def piper_truth(voice: PiperEngine, text: str) -> tuple[np.ndarray, list]:
    """Piper's audio of ``text`` and its exact word times (from its phoneme alignments), from the audio's start."""
    audio, words, start = [], [], 0
    for item in voice.synthesize(SynthesisTask(SynthesisRequest(text=text, request_id="b", timestamps=True))):
        if isinstance(item, SentenceMark):
            words += [w.shifted(start / voice.sample_rate) for w in item.words]
            start = sum(map(len, audio))
        else:
            audio.append(item)
    return np.concatenate(audio), words


def whisper_words(stt: Transcriber, audio: np.ndarray, rate: int) -> list:
    segments, _ = stt._model.transcribe(resample(audio, rate, 16000), word_timestamps=True, beam_size=1)
    return [w for s in segments for w in s.words]


def start_errors(truth: list, found: list[tuple[str, float]]) -> list[float]:
    """|start difference| of words matched by their spelling, in order."""
    errors, index = [], 0
    for word, start in found:
        key = word.strip(" .,!?").lower()
        for j in range(index, len(truth)):
            if truth[j].word.strip(".,!?").lower() == key:
                errors.append(abs(truth[j].start_s - start))
                index = j + 1
                break
    return errors


async def first_words(port: int, text: str) -> tuple[float, float]:
    async with websockets.connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
        started = time.perf_counter()
        await ws.send(json.dumps({"text": text, "seed": 1, "stream": True, "timestamps": True, "context": False}))
        audio = words = None
        while True:
            frame = await ws.recv()
            now = time.perf_counter() - started
            if isinstance(frame, bytes):
                audio = audio or now
                continue
            reply = json.loads(frame)
            if reply["status"] == "words" and words is None:
                words = now
            if reply["status"] in ("success", "error"):
                return audio, words


async def run(stt_model: str, runs: int) -> None:
    voice = PiperEngine()
    voice.load()
    stt = Transcriber(stt_model, "cpu", local_only=True)
    stt.load()
    lead = []
    for text in CALIBRATION:
        audio, truth = piper_truth(voice, text)
        aligned = stt.align(audio, voice.sample_rate, text)
        lead += [truth_word.start_s - (word.start_s - ALIGN_LEAD_S) for word, truth_word in zip(aligned, truth)]
    ours, theirs, raw, costs = [], [], [], []
    for text in TEXTS:
        audio, truth = piper_truth(voice, text)
        started = time.perf_counter()
        aligned = stt.align(audio, voice.sample_rate, text)
        costs.append((time.perf_counter() - started) / (len(audio) / voice.sample_rate))
        ours += start_errors(truth, [(w.word, w.start_s) for w in aligned])
        raw += start_errors(truth, [(w.word, w.start_s - ALIGN_LEAD_S) for w in aligned])
        theirs += start_errors(truth, [(w.word, w.start) for w in whisper_words(stt, audio, voice.sample_rate)])
    print(f"{machine()}; Whisper base int8 on CPU; Piper en_US-joe-medium; {len(TEXTS)} sentences, "
          f"{len(ours)} words")
    print(table(["word start vs Piper's exact time", "median error (ms)", "90th percentile (ms)", "ratio"], [
        ["Whisper's own word timestamps (recognition)", 1000 * statistics.median(theirs),
         1000 * float(np.percentile(theirs, 90)), 1.0],
        ["our forced aligner, uncorrected", 1000 * statistics.median(raw), 1000 * float(np.percentile(raw, 90)),
         statistics.median(raw) / statistics.median(theirs)],
        [f"our forced aligner, {1000 * ALIGN_LEAD_S:.0f} ms lead corrected", 1000 * statistics.median(ours),
         1000 * float(np.percentile(ours, 90)), statistics.median(ours) / statistics.median(theirs)]]))
    print(f"\nthe aligner's lead on the calibration set: median {1000 * statistics.median(lead):.0f} ms "
          f"({len(lead)} words; ALIGN_LEAD_S is {1000 * ALIGN_LEAD_S:.0f} ms)")
    print(f"\naligner cost: {1000 * median(costs):.0f} ms per second of audio (median of {len(costs)})\n")

    folder = build_checkpoint(Path(tempfile.mkdtemp()))
    server = TTSServer(EngineSlot(CsmEngine(lambda: folder, device="cpu")), host="127.0.0.1", port=0,
                       session_store="memory", stt=Transcriber(stt_model, "cpu", local_only=True))
    await server.start()
    await server.service.scheduler.primary.loaded.wait()
    await server.service.speech.loaded.wait()
    try:
        text = " ".join(TEXTS[:2])
        await first_words(server.port, text)
        timed = [await first_words(server.port, text) for _ in range(runs)]
    finally:
        await server.stop()
    audio, words = median([t[0] for t in timed]), median([t[1] for t in timed])
    print(table(["tiny CSM, 2 sentences, streamed with timestamps", "ms", "ratio"], [
        ["time to first audio", 1000 * audio, 1.0], ["time to first words message", 1000 * words, words / audio]]))
    print(f"(the first words wait for the first sentence to end and be aligned: {len(split_sentences(text))} "
          "sentences here)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stt-model", required=True)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(run(args.stt_model, args.runs))
