"""Voice chat latency: from the end of the user's speech to the first audio of the answer, stage by stage.

One server (tiny random CSM, the packaged Whisper base as --stt-model, Silero VAD) on loopback; a chat server
speaking OpenAI's streamed wire format (tests/fake_chat.py) stands in for the LLM with a fixed time to first
token and per-word delay.  A client streams Piper speech plus silence in real time (40 ms pieces) as a hands-free
turn with ``respond``, and times: end of speech -> ``speech_end`` (the VAD's decision, which waits
--vad-silence-ms by design) -> ``turn_saved`` (transcript) -> the first complete sentence of ``reply_text`` ->
the first audio frame.  The same process then times each model alone on the same input (Whisper on the turn,
the chat model to its first sentence through the openai SDK, CSM to its first chunk): what the server adds on
top of them is its own overhead (goal: under 50 ms).  The transcription starts at the pause (``vad_pause_ms``,
200 ms into the silence), while the VAD still waits to be sure; a second server that starts it only at the
decision (pause = the whole window) is the baseline in the same process.

    python bench/voice_chat.py --stt-model DIR [--runs 5] [--silence-ms 600]
    python bench/voice_chat.py --stt-model DIR --against REV [--runs 5]

With ``--against REV`` it compares two servers instead, ``run_server.py`` of git revision REV (in a temporary
worktree) and of this tree, each with its own defaults (turn detector, silence window), the same models and chat
server, turns taken in turn: each stage's time from the end of speech, and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import websockets

from _common import machine, median, table
from _servers import ROOT, checkout, start_server, stop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fake_chat import FakeChat  # noqa: E402
from tts_server.api.server import TTSServer  # noqa: E402
from tts_server.audio.codec import resample  # noqa: E402
from tts_server.audio.text import SentenceStream  # noqa: E402
from tts_server.core.jobs import EngineSlot  # noqa: E402
from tts_server.engines.base import SynthesisTask, audio_only  # noqa: E402
from tts_server.engines.chat import ChatModel  # noqa: E402
from tts_server.engines.csm import CsmEngine  # noqa: E402
from tts_server.engines.request import SynthesisRequest  # noqa: E402
from tts_server.engines.stt import Transcriber  # noqa: E402
from tts_server.engines.tiny_csm import build_checkpoint  # noqa: E402

SAID = "Could you tell me a short story about the sea?"
ANSWER = "Once upon a time, a small boat sailed far away. It found an island of singing birds. The end."
RATE = 16000
PIECE = 640  # 40 ms
PAUSE_MS = 200  # the server's default vad_pause_ms


def piper_speech() -> np.ndarray:
    from tts_server.audio.codec import resample
    from tts_server.engines.piper import PiperEngine

    voice = PiperEngine()
    voice.load()
    audio = np.concatenate(list(audio_only(voice.synthesize(SynthesisTask(SynthesisRequest(text=SAID, request_id="b"))))))
    return resample(audio, voice.sample_rate, RATE)


async def one_turn(port: int, speech: np.ndarray, language: str | None = None) -> dict[str, float]:
    """Stream the speech in real time; the wall-clock time of each stage's end, relative to the end of speech.
    ``language``: sent in ``turn_start`` as the voice chat page does (a server before #29 knows no such field)."""
    pad = np.zeros(RATE // 2, np.float32)
    pcm = (np.clip(np.concatenate([pad, speech, np.zeros(RATE * 2, np.float32)]), -1, 1) * 32767).astype("<i2")
    speech_end_sample = len(pad) + len(speech)
    marks: dict[str, float] = {}
    sentences = SentenceStream()
    async with websockets.connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
        await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": RATE, "vad": True,
                                  "respond": {"speaker": 0, "seed": 1}, **({"language": language} if language else {})}))

        async def send() -> None:
            started = time.perf_counter()
            for offset in range(0, len(pcm), PIECE):
                await asyncio.sleep(max(0.0, started + offset / RATE - time.perf_counter()))
                await ws.send(pcm[offset:offset + PIECE].tobytes())
                if offset <= speech_end_sample < offset + PIECE:
                    marks["speech_end"] = time.perf_counter() + (speech_end_sample - offset - PIECE) / RATE

        sender = asyncio.create_task(send())
        while "audio" not in marks:
            frame = await asyncio.wait_for(ws.recv(), 60)
            now = time.perf_counter()
            if isinstance(frame, bytes):
                marks["audio"] = now
                continue
            reply = json.loads(frame)
            if reply["status"] == "speech_end":
                marks["vad"] = now
            elif reply["status"] == "turn_saved":
                marks["transcript"] = now
            elif reply["status"] == "reply_text":
                marks.setdefault("reply", now)
                if "sentence" not in marks and sentences.add(reply["delta"]):
                    marks["sentence"] = now
        await sender
    return {k: v - marks["speech_end"] for k, v in marks.items()}


async def run(stt_model: str, runs: int, silence_ms: int, first_token: float, per_word: float) -> None:
    folder = build_checkpoint(Path(tempfile.mkdtemp()))
    speech = piper_speech()
    stt = Transcriber(stt_model, "cpu", local_only=True)
    with FakeChat(ANSWER, delay=per_word, first=first_token) as chat:
        csm = CsmEngine(lambda: folder, device="cpu")
        servers = {pause: TTSServer(EngineSlot(csm), host="127.0.0.1", port=0, session_store="memory", stt=stt,
                                    chat=ChatModel(chat.url, "bench"), vad_silence_ms=silence_ms,
                                    vad_pause_ms=pause, rate_limit=10**6) for pause in (PAUSE_MS, silence_ms)}
        for server in servers.values():
            await server.start()
            await server.service.scheduler.primary.loaded.wait()
            await server.service.speech.loaded.wait()
        server = servers[PAUSE_MS]
        try:
            await one_turn(server.port, speech)  # warm-up
            turns, late = [], []
            for _ in range(runs):  # in turn: the two servers see the same machine state
                turns.append(await one_turn(server.port, speech))
                late.append(await one_turn(servers[silence_ms].port, speech))
            # each model alone, on the same input, in the same process
            # the turn as the server keeps it: pre-roll, the speech, the pause that ended it, at 24 kHz
            turn = np.concatenate([np.zeros(RATE * 3 // 10, np.float32), speech,
                                   np.zeros(RATE * silence_ms // 1000, np.float32)])
            audio24 = resample(turn, RATE, 24000)
            whisper = [_timed(lambda: stt.transcribe(audio24)) for _ in range(runs)]
            llm = [await _first_sentence(ChatModel(chat.url, "bench")) for _ in range(runs)]
            first = SentenceStream().add(ANSWER)[0]
            csm_first = [_timed(lambda: next(csm.synthesize(SynthesisTask(SynthesisRequest(
                text=first, request_id="b", seed=1, stream=True))))) for _ in range(runs)]
        finally:
            for each in servers.values():
                await each.stop()
    stage = {"vad": median([t["vad"] for t in turns]),
             "transcript": median([t["transcript"] - t["vad"] for t in turns]),
             "sentence": median([t["sentence"] - t["transcript"] for t in turns]),
             "audio": median([t["audio"] - t["sentence"] for t in turns])}
    total = median([t["audio"] for t in turns])
    alone = {"vad": silence_ms / 1000, "transcript": median(whisper), "sentence": median(llm),
             "audio": median(csm_first)}
    names = {"vad": "end of speech -> VAD decision (speech_end)", "transcript": "-> transcript (turn_saved)",
             "sentence": "-> first LLM sentence (reply_text)", "audio": "-> first reply audio"}
    print(f"{machine()}; tiny random CSM, Whisper base int8, Silero VAD ({silence_ms} ms), chat: first token "
          f"{first_token * 1000:.0f} ms, {per_word * 1000:.0f} ms per word; {runs} turns; medians")
    rows = [[names[k], stage[k] * 1000, stage[k] / total, alone[k] * 1000, stage[k] / alone[k]] for k in stage]
    rows.append(["end of speech -> first reply audio", total * 1000, 1.0, sum(alone.values()) * 1000,
                 total / sum(alone.values())])
    print(table(["stage", "ms", "share", "the model alone (ms)", "ratio"], rows))
    waited = median([t["audio"] for t in late])
    print(f"\nour overhead on top of the models: {(waited - sum(alone.values())) * 1000:.0f} ms (the baseline "
          "server below, whose stages run one after another as the models alone do)")
    print(table(["end of speech -> first reply audio", "ms", "ratio"], [
        ["transcription started at the VAD's decision (baseline)", waited * 1000, 1.0],
        [f"transcription started at the pause ({PAUSE_MS} ms into the silence)", total * 1000, total / waited]]))


async def compare(stt_model: str, runs: int, revision: str, first_token: float, per_word: float) -> None:
    """``run_server.py`` of ``revision`` and of this tree with their defaults, the same models and chat server;
    turns in turn; each stage's median time from the end of speech."""
    speech = piper_speech()
    with FakeChat(ANSWER, delay=per_word, first=first_token) as chat, tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_checkpoint(tmp / "model")
        args = ["--engine", "csm", "--mode", "reuse", "--model-path", str(model), "--stt-model", stt_model,
                "--chat-url", chat.url, "--chat-model", "bench", "--session-store", "memory", "--rate-limit", "1000000"]
        languages = {"baseline": None, "now": "en"}
        with checkout(revision, tmp / "baseline") as baseline:
            servers: dict = {}
            try:
                servers = {"baseline": start_server(baseline, args, tmp / "b"), "now": start_server(ROOT, args, tmp / "n")}
                for who, (_, port) in servers.items():
                    await one_turn(port, speech, languages[who])  # warm-up (and the recogniser loaded)
                marks: dict[str, list] = {who: [] for who in servers}
                for _ in range(runs):
                    for who, (_, port) in servers.items():
                        marks[who].append(await one_turn(port, speech, languages[who]))
            finally:
                for proc, _ in servers.values():
                    stop(proc)
    names = {"vad": "end of speech -> speech_end", "transcript": "-> turn_saved", "reply": "-> first reply_text",
             "audio": "-> first reply audio (end of speech -> first audio)"}
    print(f"{machine()}; tiny random CSM, Whisper base int8, each server's defaults; chat: first token "
          f"{first_token * 1000:.0f} ms, {per_word * 1000:.0f} ms per word; {runs} turns each, in turn; medians of "
          f"the time from the end of speech; baseline = {revision}; this tree's client sends turn_start's language")
    rows = []
    for key, name in names.items():
        before, after = (median([m[key] for m in marks[who]]) for who in ("baseline", "now"))
        rows.append([name, before * 1000, after * 1000, after / before])
    print(table(["stage (time since the end of speech)", f"{revision} (ms)", "this tree (ms)", "ratio"], rows))


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


async def _first_sentence(chat: ChatModel) -> float:
    started, sentences = time.perf_counter(), SentenceStream()
    async for delta in chat.stream([{"role": "user", "content": SAID}]):
        if sentences.add(delta):
            break
    elapsed = time.perf_counter() - started
    await chat.close()
    return elapsed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stt-model", required=True, help="a faster-whisper model folder")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--silence-ms", type=int, default=600)
    parser.add_argument("--first-token-ms", type=float, default=200)
    parser.add_argument("--ms-per-word", type=float, default=30)
    parser.add_argument("--against", metavar="REV", help="compare run_server.py of this git revision with this "
                                                           "tree's, each with its defaults")
    args = parser.parse_args()
    if args.against:
        asyncio.run(compare(args.stt_model, args.runs, args.against, args.first_token_ms / 1000,
                            args.ms_per_word / 1000))
    else:
        asyncio.run(run(args.stt_model, args.runs, args.silence_ms, args.first_token_ms / 1000,
                        args.ms_per_word / 1000))
