"""Smart Turn v3.2 as the server runs it: the model file from the pipecat-ai wheel, our features and session."""

from __future__ import annotations

import numpy as np
import pytest

from audio_fixtures import spoken, steady

RATE = 16000


def clip(text: str, after: float = 0.2) -> np.ndarray:
    return np.concatenate([np.zeros(int(0.3 * RATE), np.float32), spoken(text, RATE),
                           np.zeros(int(after * RATE), np.float32)])


def test_the_probability_is_pipecats_own_analyzers_on_the_same_audio():
    """Our feature extraction (transformers' Whisper features) and session give what Pipecat's
    LocalSmartTurnAnalyzerV3 gives, short clips (zero-padded to 8 s) and long ones (their last 8 s) alike."""
    from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3

    from tts_server.engines.turn_detector import SmartTurn

    ours, theirs = SmartTurn(), LocalSmartTurnAnalyzerV3(sample_rate=RATE)
    long = np.concatenate([clip("Could you tell me a short story about the sea?")] * 4)
    for audio in (clip("My favourite colour is green, but"), clip("What time is it?"), long):
        expected = theirs._predict_endpoint(audio)["probability"]
        assert ours.probability(audio) == pytest.approx(expected, abs=1e-6)


def test_a_sentence_that_goes_on_is_heard_as_incomplete_and_a_finished_one_as_complete():
    from tts_server.engines.turn_detector import smart_turn

    model = smart_turn()
    quiet, after = np.zeros(int(0.3 * RATE), np.float32), np.zeros(int(0.2 * RATE), np.float32)
    assert not model.complete(np.concatenate([quiet, steady("My favourite colour is green, but"), after]))
    assert not model.complete(np.concatenate([quiet, steady("I went to the shop and"), after]))
    assert model.complete(np.concatenate([quiet, steady("Please remind me to call my mother."), after]))



@pytest.mark.parametrize("verdict, early, late", [("weak", False, True), ("sure", True, True), ("no", False, False)])
def test_a_weak_yes_does_not_end_a_short_silence_but_does_a_longer_one(monkeypatch, verdict, early, late):
    """Within SURE_UNTIL_MS of silence "complete" must be SURE; from then on (and without a silence given) the
    plain threshold holds."""
    from tts_server.engines.turn_detector import COMPLETE, SURE, SURE_UNTIL_MS, smart_turn

    probability = {"weak": (COMPLETE + SURE) / 2, "sure": (SURE + 1) / 2, "no": COMPLETE / 2}[verdict]
    model, audio = smart_turn(), np.zeros(RATE, np.float32)
    monkeypatch.setattr(model, "probability", lambda heard: probability)
    assert model.complete(audio, 200) is early
    assert model.complete(audio, SURE_UNTIL_MS) is late and model.complete(audio) is late
