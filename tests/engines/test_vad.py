"""Silero VAD: one model for every listener of the process, the state of each stream its own, the scores those of
silero-vad's own wrapper, and no change to how torch computes on the thread that loads it."""

from __future__ import annotations

import numpy as np
import torch

from audio_fixtures import spoken
from tts_server.engines import vad


def events(detector: vad.SpeechDetector, pieces: list[np.ndarray]) -> list[tuple[vad.Voice, int]]:
    return [(e.kind, e.sample) for piece in pieces for e in detector.feed(piece)]


def pieces_of(audio: np.ndarray, size: int = 1234) -> list[np.ndarray]:
    return [audio[i:i + size] for i in range(0, len(audio), size)]


def talk(text: str, gap_s: float = 1.0) -> np.ndarray:
    gap = np.zeros(int(gap_s * vad.RATE), np.float32)
    return np.concatenate([gap, spoken(text, vad.RATE), gap])


def test_every_detector_shares_one_silero_model():
    first, second = vad.SpeechDetector(), vad.SpeechDetector(silence_ms=300)
    assert first.model is second.model is vad.silero_model()


def test_detectors_fed_in_turn_keep_their_own_state():
    """Two listeners' audio scored alternately, piece by piece, on the one model: each gets the events it gets
    alone."""
    a_audio, b_audio = talk("The weather is lovely today."), talk("Could you tell me a story?", gap_s=0.3)
    alone_a = events(vad.SpeechDetector(), pieces_of(a_audio))
    alone_b = events(vad.SpeechDetector(), pieces_of(b_audio))
    a, b = vad.SpeechDetector(), vad.SpeechDetector()
    together_a, together_b = [], []
    for piece_a, piece_b in zip(pieces_of(a_audio), pieces_of(b_audio)):
        together_a += events(a, [piece_a])
        together_b += events(b, [piece_b])
    together_a += events(a, pieces_of(a_audio)[len(pieces_of(b_audio)):])
    together_b += events(b, pieces_of(b_audio)[len(pieces_of(a_audio)):])
    assert (vad.Voice.SPEECH_START in [k for k, _ in alone_a]) and (vad.Voice.SPEECH_START in [k for k, _ in alone_b])
    assert together_a == alone_a and together_b == alone_b


def test_scores_equal_those_of_silero_vads_own_model_wrapper():
    threads = torch.get_num_threads()
    try:
        from silero_vad import load_silero_vad  # its import sets torch's thread count: restored below

        theirs = load_silero_vad(onnx=True)
    finally:
        torch.set_num_threads(threads)
    audio = talk("One two three.", gap_s=0.2)
    windows = [audio[i:i + vad.WINDOW] for i in range(0, len(audio) - vad.WINDOW + 1, vad.WINDOW)]
    state = vad.SileroState()
    ours = [vad.silero_model().probability(state, window) for window in windows]
    expected = [float(theirs(torch.from_numpy(window.copy()), vad.RATE)) for window in windows]
    assert np.allclose(ours, expected, atol=1e-5) and max(ours) > 0.9 and min(ours) < 0.1


def test_loading_the_model_leaves_the_loading_threads_torch_settings_alone():
    """In a fresh process (an import happens once per process, whatever ran before in this one)."""
    import subprocess
    import sys

    from conftest import ROOT

    script = ("import torch; torch.set_num_threads(2); from tts_server.engines.vad import SpeechDetector; "
              "SpeechDetector(); print(torch.get_num_threads())")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "2"
