"""The CSM-1B engine: loading, prompt building and sentence-by-sentence generation.

Prompts follow CSM's chat format (role = speaker id as a string of digits;
context turns carry text + audio, the last turn text only).  Context audio is
held as Mimi codes: a reference clip is encoded once and its codes cached
(transformers re-encodes context audio on every call), and turns CSM spoke
itself are fed back as the codes it produced, so nothing is re-encoded and no
codec round trip blurs the voice.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from pathlib import Path
from typing import Any, Generator, Iterator

import numpy as np
import torch

from .request import SynthesisRequest
from ..audio.pcm import FRAME_MS, FRAME_SECONDS, OUTPUT_RATE
from ..audio.text import estimate_ms, frames_for_ms, spoken_s, split_sentences
from .base import TURN_CODES, ContextTurn, Engine, EngineError, SentenceMark, SynthesisTask
from .errors import ErrorCode
from .csm_batch import Batcher
from .csm_decode import CsmDecoder, Sampling
from .quantize import quantize_model
from .mimi_stream import MimiStreamDecoder, MimiStreamEncoder

log = logging.getLogger(__name__)
# CSM has no speaking-rate control, and a time-stretch of streamed audio would need a streaming, pitch-keeping
# stretcher that none of the maintained Python audio libraries offers: refused rather than done badly.


def cut_off(speaker: int, sentence: str, frames: list[torch.Tensor]) -> ContextTurn:
    """The beginning of a sentence a cancel cut off: its frames that went out, with the whole sentence's text and
    how long that text takes to say (a barge-in keeps the share of its words that was heard)."""
    heard_s = FRAME_SECONDS * len(frames)
    return ContextTurn(speaker, sentence, None, {TURN_CODES: torch.stack(frames)}, duration=heard_s,
                       text_s=max(heard_s, spoken_s(sentence)))


def pick_device(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(requested: str, device: str, quantize: str = "none") -> torch.dtype:
    """``auto``: bfloat16 on CUDA with native support; on a CPU, bfloat16 where it computes it natively (measured
    1.4x faster per frame there, docs/benchmarks.md) or under ``--quantize int8`` (its fast kernel); else float32."""
    if requested != "auto":
        return getattr(torch, requested)
    if device == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):  # emulated bf16 is slow
        return torch.bfloat16
    if device == "cpu" and (native_cpu_bf16() or quantize == "int8"):
        return torch.bfloat16
    return torch.float32


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); read from Linux's cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


CLOSE_WAIT_S = 10  # how long close waits for the batch thread's current step


class CsmEngine(Engine):
    name = "csm"
    seedable = True  # the exactness tests show a seed fixes the tokens (alone or batched)
    native_speed = False  # other speeds: the core time-stretches its audio
    words = "CSM's word times come from an aligner: start the server with --stt-model"
    sample_rate = OUTPUT_RATE

    def __init__(self, locate, device: str = "auto", dtype: str = "float32", label: str = "csm",
                 first_chunk_frames: int = 2, chunk_frames: int = 6, max_batch: int = 1,
                 compile: bool = False, quantize: str = "none") -> None:
        """``locate`` is a callable returning the model folder (it may download: it runs in the loader).

        ``quantize="int8"``: int8 projections (``quantize.py``).  ``dtype="auto"``: see ``pick_dtype``.
        """
        self._locate = locate
        self.first_chunk_frames, self.chunk_frames = first_chunk_frames, chunk_frames
        self.concurrency = max_batch  # requests the scheduler may run at once: they share the batch
        self.compile = compile
        self.quantize = quantize
        self.batcher: Batcher | None = None
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device, quantize)
        self.label = label
        self.folder: Path | None = None
        self.processor = None
        self.model = None
        self.decoder: CsmDecoder | None = None

    def load(self) -> None:
        from transformers import AutoProcessor, CsmForConditionalGeneration

        self.folder = Path(self._locate())
        log.info("Loading CSM from %s onto %s (%s)", self.folder, self.device, str(self.dtype).split(".")[-1])
        class CodecInFloat32(CsmForConditionalGeneration):
            """Loads the Mimi codec's weights in float32 whatever ``dtype`` the rest gets (never via bfloat16)."""

            _keep_in_fp32_modules_strict = ["codec_model"]

        try:
            self.processor = AutoProcessor.from_pretrained(self.folder)
            model = CodecInFloat32.from_pretrained(self.folder, dtype=self.dtype)
        except Exception as exc:  # a broken folder is a load failure, never a crash
            raise RuntimeError(f"cannot load CSM from {self.folder}: {exc.__class__.__name__}: {exc}") from exc
        self.use_model(self.processor, model)

    def use_model(self, processor, model) -> None:
        """Adopt an already built processor and model (``load`` ends here; benchmarks start here)."""
        model.codec_model.float()  # the codec stays float32: it is small and bf16 audio is audibly worse
        self.processor = processor
        specials = sorted(processor.tokenizer.added_tokens_encoder, key=len, reverse=True)
        self._specials = re.compile("|".join(map(re.escape, specials)) or "(?!)")
        self.model = model.to(self.device).eval()
        if self.quantize == "int8":
            started = time.perf_counter()
            size = quantize_model(self.model)
            log.info("CSM's projections quantized to int8 (%.2f GB) in %.1f s; computing in %s", size / 1e9,
                     time.perf_counter() - started, self.precision())
        self.decoder = CsmDecoder(self.model, compile=self.compile)
        self.batcher = Batcher(self.decoder, self.concurrency) if self.concurrency > 1 else None
        self.max_positions = int(self.model.config.max_position_embeddings)
        if self.compile:  # compile every graph now (tens of seconds), not in the first client's request
            warm = SynthesisTask(SynthesisRequest(text="Warming up.", request_id="warm-up", context=False,
                                                  max_audio_length_ms=160))
            started = time.perf_counter()
            for _ in self.synthesize(warm):
                pass
            log.info("compiled CSM's depth-decoder step in %.1f s", time.perf_counter() - started)

    def describe(self) -> dict[str, Any]:
        return {"model": self.label, "device": self.device, "dtype": str(self.dtype).split(".")[-1],
                "precision": self.precision(), "sample_rate": self.sample_rate, "max_batch": self.concurrency,
                "languages": list(self.languages())}

    def languages(self) -> tuple[str, ...]:
        return ("en",)  # CSM-1B was trained on English

    def precision(self) -> str:
        """What the projections compute in, as the startup log and ``/v1/info`` say it."""
        dtype = str(self.dtype).split(".")[-1]
        return f"int8 weights, {dtype} activations" if self.quantize == "int8" else dtype

    # -- prompts ------------------------------------------------------------------
    def codes_for(self, turn: ContextTurn) -> torch.Tensor:
        """Mimi codes of a context turn, encoded once and kept in the turn's shared cache."""
        codes = turn.cache.get(TURN_CODES)
        if codes is None:
            if turn.audio is None:
                raise EngineError(ErrorCode.INTERNAL_ERROR, "a context turn has neither audio nor codes")
            codes = self.decoder.encode_audio(torch.from_numpy(np.ascontiguousarray(turn.audio)))
            turn.cache[TURN_CODES] = codes
        elif isinstance(codes, np.ndarray):  # a stored session turn
            codes = turn.cache[TURN_CODES] = torch.from_numpy(codes).to(self.device)
        return codes

    def stream_encoder(self) -> MimiStreamEncoder:
        """Codes of a clip that arrives in pieces (``MimiStreamEncoder``); equal to ``codes_for`` on the whole
        clip zero-padded to whole frames."""
        if self.model is None:
            raise EngineError(ErrorCode.MODEL_UNAVAILABLE, "CSM is not loaded")
        return MimiStreamEncoder(self.model.codec_model, self.decoder.num_codebooks)

    def prompt_ids(self, turns: list[ContextTurn], text: str, speaker: int) -> torch.Tensor:
        """Token ids of the CSM prompt: ``turns`` as context, then ``text`` to speak.

        The chat template renders one ``<|AUDIO|>`` per audio turn; it is expanded
        to one per frame, exactly as the processor does for raw audio.  The
        texts are the clients' words: spelled special tokens in them
        (``<|AUDIO|>``, ``<|begin_of_text|>`` ...) are tokenized as plain text, so
        no client can forge audio slots, turn ends or another speaker's turn.
        """
        texts = [t.text for t in turns] + [text]
        tokenizer = self.processor.tokenizer
        if not any(self._specials.search(t) for t in texts):  # the common case: exactly the processor's ids
            prompt = self._render(turns, texts, speaker)
            return tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        marks = [f"\ue000{i}\ue001" for i in range(len(texts))]
        pieces = re.split("\ue000(\\d+)\ue001", self._render(turns, marks, speaker))
        ids: list[int] = []
        for i, piece in enumerate(pieces):  # template text, index of a client text, template text, ...
            client = i % 2 == 1
            piece = texts[int(piece)] if client else piece
            if piece:
                ids += tokenizer(piece, add_special_tokens=False, split_special_tokens=client)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def _render(self, turns: list[ContextTurn], texts: list[str], speaker: int) -> str:
        """The chat template's prompt with each audio slot expanded to one ``<|AUDIO|>`` per frame."""
        roles = [str(t.speaker) for t in turns] + [str(speaker)]
        conversation = [{"role": role, "content": [{"type": "text", "text": text}]} for role, text in zip(roles, texts)]
        for message in conversation[:-1]:
            message["content"].append({"type": "audio", "path": ""})
        rendered = self.processor.apply_chat_template(conversation, tokenize=False)
        token = self.processor.audio_token
        pieces = rendered.split(token)
        if len(pieces) != len(turns) + 1:
            raise EngineError(ErrorCode.INTERNAL_ERROR, "chat template did not render one audio slot per context turn")
        return pieces[0] + "".join(token * self.codes_for(t).shape[0] + rest for t, rest in zip(turns, pieces[1:]))

    def fit_context(self, turns: list[ContextTurn], text: str, speaker: int,
                    frames: int) -> tuple[torch.Tensor, list[ContextTurn]]:
        """Drop the oldest unpinned whole turns until prompt + ``frames`` fit CSM's positions."""
        turns = list(turns)
        while True:
            ids = self.prompt_ids(turns, text, speaker)
            if ids.shape[0] + frames <= self.max_positions:
                return ids, turns
            droppable = next((i for i, t in enumerate(turns) if not t.pinned), None)
            if droppable is None:
                raise EngineError(ErrorCode.TEXT_TOO_LONG,
                                          f"the text needs {ids.shape[0]} prompt positions (with its voice and emotion "
                                          f"references) plus {frames} audio frames; CSM has {self.max_positions}")
            turns.pop(droppable)

    # -- generation ---------------------------------------------------------------
    def synthesize(self, task: SynthesisTask) -> Iterator[np.ndarray]:
        """Yield audio as it is generated: after ``first_chunk_frames`` frames, then every ``chunk_frames``.

        Each sentence is prompted with the task's context, the request's earlier
        sentences (as the codes the model produced) and the emotion reference
        last.  One streaming Mimi decoder runs across all sentences, so sentence
        boundaries have no seams; each frame is decoded exactly once.
        """
        assert self.decoder is not None, "load() first"
        request = task.request
        sampling = Sampling(temperature=request.temperature, top_k=request.top_k)
        rng = torch.Generator(device=self.device)
        if request.seed is None:
            rng.seed()
        else:
            rng.manual_seed(request.seed)
        audio = MimiStreamDecoder(self.model.codec_model)
        remaining_ms = request.max_audio_length_ms or float("inf")  # no cap: the whole text is spoken
        spoken: list[ContextTurn] = []
        for sentence in (part for text in task.texts() for part in split_sentences(text)):
            if task.cancel.is_set():
                return
            if remaining_ms < FRAME_MS:
                task.truncated = True
                return
            budget = frames_for_ms(min(estimate_ms(sentence), remaining_ms))
            frames = self._frames(task, spoken, sentence, sampling, budget, rng)
            said = yield from self._speak(task, sentence, frames, audio, first=not spoken)
            if said is None:  # cancelled
                return
            turn, made = said
            if made == budget and remaining_ms < estimate_ms(sentence):
                task.truncated = True  # the request's cap, not the sentence's end, stopped it
            remaining_ms -= FRAME_MS * made
            spoken.append(turn)
            yield SentenceMark(sentence, audio=turn.audio)  # its words: the core's aligner, if there is one

    def _frames(self, task: SynthesisTask, spoken: list[ContextTurn], sentence: str, sampling: Sampling,
                budget: int, rng: torch.Generator) -> Iterator[torch.Tensor]:
        """One sentence's frames (at most ``budget``), prompted with what fits of the context, the request's
        earlier sentences and the emotion reference; from the shared batch when there is one."""
        candidates = task.context + spoken + ([task.reference] if task.reference else [])
        ids, turns = self.fit_context(candidates, sentence, task.request.speaker, budget)
        embeds = self.decoder.embed_prompt(ids, [self.codes_for(t) for t in turns])
        if self.batcher is not None:
            return self.batcher.frames(embeds, sampling, budget, rng, task.cancel)
        return self.decoder.frames(embeds, sampling, budget, rng)

    def _speak(self, task: SynthesisTask, sentence: str, frames_iter: Iterator[torch.Tensor],
               audio: MimiStreamDecoder, first: bool) -> Generator[np.ndarray, None, tuple[ContextTurn, int] | None]:
        """Decode and yield one sentence's frames in chunks (``first``: the request's first audio, which goes
        after ``first_chunk_frames``); returns its turn and how many frames it took, or None when cancelled.

        Its turn joins ``task.produced`` before its last chunk goes (a cancel at that chunk keeps it whole); a
        sentence stopped part way leaves the part that went out in ``task.unfinished``."""
        request, cancel = task.request, task.cancel
        frames: list[torch.Tensor] = []
        chunks: list[np.ndarray] = []
        pending = 0
        turn = None
        try:
            with contextlib.closing(frames_iter):  # however this ends, the batch row is given back at once
                for frame in frames_iter:
                    if cancel.is_set():
                        return None
                    frames.append(frame)
                    pending += 1
                    if pending >= (self.first_chunk_frames if first else self.chunk_frames):
                        chunks.append(audio.decode(torch.stack(frames[-pending:])).numpy())
                        first, pending = False, 0
                        yield chunks[-1]
            if cancel.is_set():  # the batch dropped the row (cancelled during its prefill, or between frames)
                return None
            if not frames:
                raise EngineError(ErrorCode.GENERATION_FAILED,
                                  f"CSM produced no audio for {sentence[:40]!r} (immediate end of audio)")
            last = pending
            if pending:
                chunks.append(audio.decode(torch.stack(frames[-pending:])).numpy())
                pending = 0
            turn = ContextTurn(request.speaker, sentence, np.concatenate(chunks), {TURN_CODES: torch.stack(frames)})
            task.produced.append(turn)  # before its last chunk goes: a cancel at that chunk keeps it whole
            if last:
                yield chunks[-1]
        finally:  # stopped inside the sentence (a cancel closes this generator at a yield): what went out of it
            if turn is None and len(frames) > pending:
                task.unfinished = cut_off(request.speaker, sentence, frames[:len(frames) - pending])
        return turn, len(frames)

    def recover(self, stalled_for: float) -> None:
        """Replace a batch thread stuck in one step for ``stalled_for`` s; its requests end with an error."""
        batcher = self.batcher
        if batcher is not None and batcher.stalled_for() >= stalled_for:
            log.error("CSM's batch thread has been stuck for %.0f s; starting a fresh one", batcher.stalled_for())
            self.batcher = Batcher(self.decoder, self.concurrency)
            batcher.abandon(f"CSM's batch thread was stuck for over {stalled_for:g} s and was abandoned")

    def close(self) -> None:
        """Drop the model and stop the batch thread (it holds the batch's KV cache), so their memory goes now."""
        if self.batcher is not None:
            self.batcher.abandon("CSM was closed")
            if not self.batcher.join(CLOSE_WAIT_S):
                log.warning("CSM's batch thread is still in a step after %g s; closing without it", CLOSE_WAIT_S)
        self.model = self.decoder = self.batcher = self.processor = None
        if self.device == "cuda":
            torch.cuda.empty_cache()
