"""Emotion maps, path confinement, voice-prompt checks and the references CLI (no model needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from audio_fixtures import audio_bytes, speechlike, write_audio
from conftest import ROOT
from tts_server.references import (ReferenceError, confined, load_emotions, load_voices, write_json_atomic)
from tts_server.references.datasets import cremad, emodb, ravdess
from tts_server.references.quality import check_voice_prompt, estimate_snr_db


def write_map(root, data) -> None:
    (root / "emotion_map.json").write_text(json.dumps(data))


def test_good_clips_load_as_24k_mono_and_bad_entries_are_skipped_by_name(tmp_path):
    root = tmp_path / "refs"
    write_audio(root / "happy" / "stereo44k.wav", speechlike(1.5, 44100), 44100, channels=2)
    write_audio(root / "happy" / "plain.flac", speechlike(2.0), fmt="FLAC")
    write_audio(root / "sad" / "short.wav", speechlike(0.3))
    write_audio(root / "sad" / "long.wav", speechlike(31))
    (root / "sad" / "garbage.wav").write_bytes(b"not audio at all")
    write_audio(tmp_path / "outside.wav", speechlike(1.0))
    os.symlink(tmp_path / "outside.wav", root / "sad" / "link.wav")
    write_map(root, {
        "happy": [{"path": "happy/stereo44k.wav", "text": "Hello!", "source": "test"},
                  {"path": "happy/plain.flac", "text": "Hi.", "speaker": 2}],
        "sad": [{"path": "sad/short.wav", "text": "Too short."}, {"path": "sad/long.wav", "text": "Too long."},
                {"path": "sad/garbage.wav", "text": "Broken."}, {"path": "sad/link.wav", "text": "Escapes."},
                {"path": "../outside.wav", "text": "Escapes."}, {"path": str(tmp_path / "outside.wav"), "text": "x"},
                {"path": "happy/plain.flac"}, {"path": "sad/missing.wav", "text": "Gone."}],
        "angry": "not a list",
    })
    emotions, warnings = load_emotions(root)
    assert sorted(emotions) == ["happy"]
    stereo, plain = emotions["happy"]
    assert stereo.audio.dtype == np.float32 and stereo.audio.ndim == 1
    assert stereo.duration_s == pytest.approx(1.5, abs=0.01) and stereo.source == "test"
    assert plain.speaker == 2 and plain.duration_s == pytest.approx(2.0, abs=0.01)
    assert len(warnings) == 9
    text = "\n".join(warnings)
    for needle in ("short.wav", "long.wav", "garbage.wav", "link.wav", "'../outside.wav'", "outside.wav",
                   "needs a 'text'", "missing.wav", "'angry'"):
        assert needle in text, needle


def test_malformed_map_is_one_error_and_no_emotions(tmp_path):
    (tmp_path / "emotion_map.json").write_text("{broken json")
    emotions, warnings = load_emotions(tmp_path)
    assert emotions == {} and len(warnings) == 1 and "malformed" in warnings[0]
    (tmp_path / "emotion_map.json").write_text("[1, 2]")
    assert load_emotions(tmp_path)[0] == {}


@pytest.mark.parametrize("path", ["../x.wav", "/etc/passwd", "a/../../x.wav", "", "a/../../../etc/hosts"])
def test_path_escapes_are_rejected(tmp_path, path):
    with pytest.raises(ReferenceError):
        confined(tmp_path, path)


def test_symlinked_folder_leading_out_is_rejected(tmp_path):
    root = tmp_path / "refs"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "sub")
    with pytest.raises(ReferenceError, match="outside"):
        confined(root, "sub/clip.wav")
    assert confined(root, "inside/clip.wav") == (root / "inside" / "clip.wav").resolve()


def test_voice_prompt_accepted_and_converted():
    audio = check_voice_prompt(audio_bytes(speechlike(2.0, 16000), 16000))
    assert len(audio) == 48000 and audio.dtype == np.float32


@pytest.mark.parametrize("make, reason", [
    (lambda: audio_bytes(speechlike(0.6)), "lasts"),
    (lambda: audio_bytes(speechlike(31)), "lasts"),
    (lambda: audio_bytes(np.zeros(48000, dtype=np.float32)), "silent"),
    (lambda: audio_bytes(np.sign(speechlike(2.0)) * 1.0), "clipped"),
    (lambda: audio_bytes(np.random.default_rng(0).normal(0, 0.2, 48000).astype(np.float32)), "signal-to-noise"),
    (lambda: b"RIFF....WAVEnot really", "cannot be decoded"),
    (lambda: b"\0" * (10 * 1024 * 1024 + 1), "limit is 10 MB"),
])
def test_voice_prompt_rejections_say_what_to_fix(make, reason):
    with pytest.raises(ReferenceError, match=reason):
        check_voice_prompt(make())


def test_snr_estimate_separates_clean_speech_from_noise():
    assert estimate_snr_db(speechlike(2.0)) > 40
    assert estimate_snr_db(np.random.default_rng(1).normal(0, 0.1, 48000)) < 5


def test_atomic_map_write_leaves_the_old_map_when_writing_fails(tmp_path):
    target = tmp_path / "voices.json"
    write_json_atomic(target, {"1": {"path": "a.wav", "text": "old"}})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"1": object()})
    assert json.loads(target.read_text()) == {"1": {"path": "a.wav", "text": "old"}}
    assert [p.name for p in tmp_path.iterdir()] == ["voices.json"]


def test_dataset_file_names_map_to_emotion_and_transcript():
    assert ravdess("03-01-05-01-02-01-12.wav") == ("angry", "Dogs are sitting by the door.")
    assert ravdess("03-02-05-01-02-01-12.wav") is None  # song, not speech
    assert cremad("1001_DFA_ANG_XX.wav") == ("angry", "Don't forget a jacket.")
    assert cremad("1001_XYZ_ANG_XX.wav") is None
    assert emodb("03a01Fa.wav") == ("happy", "Der Lappen liegt auf dem Eisschrank.")
    assert emodb("03a03Fa.wav") is None


def cli(*args, refs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tts_server.references", "--references", str(refs), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_references_cli_add_import_voice_list_check(tmp_path):
    refs, data = tmp_path / "refs", tmp_path / "datasets"
    write_audio(data / "mine.wav", speechlike(1.2, 48000), 48000, channels=2)
    done = cli("add", "happy", str(data / "mine.wav"), "--text", "My own clip.", "--speaker", "1", refs=refs)
    assert done.returncode == 0, done.stderr
    for name in ("03-01-05-01-02-01-12.wav", "03-01-05-02-01-01-13.wav", "03-01-03-01-01-01-01.wav",
                 "03-02-05-01-01-01-01.wav", "readme.wav"):
        write_audio(data / "ravdess" / "Actor_12" / name, speechlike(1.0, 48000), 48000)
    for name in ("1001_DFA_ANG_XX.wav", "1002_IEO_SAD_HI.wav", "bad_name.wav"):
        write_audio(data / "cremad" / name, speechlike(1.0, 16000), 16000)
    for name in ("03a01Fa.wav", "08b02Wc.wav"):
        write_audio(data / "emodb" / name, speechlike(1.0, 16000), 16000)
    ravdess_run = cli("import", "ravdess", str(data / "ravdess"), "--limit-per-emotion", "1", refs=refs)
    assert ravdess_run.returncode == 0, ravdess_run.stderr
    assert "imported 2, skipped 2 unknown names" in ravdess_run.stdout  # one angry over the limit
    assert "skipped 1 unknown names" in cli("import", "cremad", str(data / "cremad"), refs=refs).stdout
    assert "imported 2" in cli("import", "emodb", str(data / "emodb"), refs=refs).stdout
    assert cli("voice", "3", str(data / "mine.wav"), "--text", "My own clip.", refs=refs).returncode == 0
    emotion_map = json.loads((refs / "emotion_map.json").read_text())
    assert {c["source"] for c in emotion_map["angry"]} == {"ravdess", "cremad", "emodb"}
    assert emotion_map["happy"][0] == {"path": "happy/mine.wav", "text": "My own clip.", "speaker": 1}
    assert emotion_map["sad"][0]["text"] == "It's eleven o'clock."
    emotions, warnings = load_emotions(refs)
    assert warnings == [] and emotions["happy"][0].duration_s == pytest.approx(1.2, abs=0.01)
    voices, _ = load_voices(refs)
    assert voices[3].text == "My own clip."
    listing = cli("list", refs=refs).stdout
    assert "angry: 3 clips" in listing and "voice 3:" in listing
    assert cli("check", refs=refs).returncode == 0
    emotion_map["sad"].append({"path": "../escape.wav", "text": "x"})
    (refs / "emotion_map.json").write_text(json.dumps(emotion_map))
    bad = cli("check", refs=refs)
    assert bad.returncode == 1 and "escape.wav" in bad.stderr
