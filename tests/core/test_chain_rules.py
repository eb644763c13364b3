"""The engine chain's pure rules: language matching, voice folders, the response cache's LRU and keys, and the
settings that build a chain (no server; the server-level behaviour is in test_routing, test_remote, test_cache)."""

from __future__ import annotations

import json

import pytest

from conftest import piper_voice_in
from tts_server.core.cache import AudioCache, Entry, key
from tts_server.core.events import Succeeded
from tts_server.settings import load_settings
from tts_server.engines.piper import voice_files
from tts_server.engines.remote import parse_voices
from tts_server.audio.languages import normalize, pick, speaks
from tts_server.engines.request import SynthesisRequest


def test_language_codes_match_exactly_first_then_by_language():
    assert normalize("en-us") == "en_US" and normalize("DE") == "de"
    assert pick("en_GB", ["de_DE", "en_US", "en_GB"]) == 2
    assert pick("en_GB", ["de_DE", "en_US"]) == 1
    assert pick("de", ["en_US", "de_DE"]) == 1
    assert pick("fr", ["en_US", "de_DE"]) is None
    assert speaks(None, "fr") and speaks(["en"], None) and not speaks(["en"], "fr")


def test_a_voice_folder_gives_every_voice_in_it_sorted(tmp_path):
    german = piper_voice_in("de_DE", tmp_path)
    english = piper_voice_in("en_US", tmp_path)
    assert voice_files([tmp_path]) == [german, english]
    assert voice_files([english, tmp_path / "missing.onnx"]) == [english, tmp_path / "missing.onnx"]


def entry(size: int) -> Entry:
    return Entry(bytes(size), "csm", Succeeded("r", "wav", 24000, size, 0.1, "csm", 0))


def test_the_cache_drops_least_recently_used_entries_to_stay_within_its_bytes():
    probe = AudioCache(10**6)
    probe.put(("a",), entry(4000))
    one = probe.bytes  # an entry's weight: its audio plus its key and replies
    assert one > 4000
    cache = AudioCache(2 * one + one // 2)
    for name in "abc":
        assert cache.put((name,), entry(4000))
    assert cache.bytes <= cache.max_bytes and cache.get(("a",)) is None and cache.evictions == 1
    assert cache.get(("b",)) is not None  # b is now the most recently used: d pushes c out, not b
    cache.put(("d",), entry(4000))
    assert cache.get(("c",)) is None and cache.get(("b",)) is not None and cache.bytes == 2 * one
    assert not cache.put(("huge",), entry(3 * one)) and cache.bytes == 2 * one
    assert (cache.hits, cache.misses) == (2, 2) and cache.describe()["hit_rate"] == 0.5


def test_only_seeded_requests_without_context_have_a_cache_key():
    request = SynthesisRequest(text="Hi.", request_id="r", seed=1, context=False)
    assert key(request, "salt") is not None
    assert key(SynthesisRequest(text="Hi.", request_id="r", context=False), "salt") is None
    assert key(SynthesisRequest(text="Hi.", request_id="r", seed=1), "salt") is None
    other_id = SynthesisRequest(text="Hi.", request_id="other", seed=1, context=False)
    assert key(other_id, "salt") == key(request, "salt") != key(request, "other salt")
    for change in ({"seed": 2}, {"speaker": 1}, {"format": "flac"}, {"engine": "csm"}, {"temperature": 0.5}):
        assert key(SynthesisRequest(**{**request.__dict__, **change}), "salt") != key(request, "salt")


def test_remote_voices_map_speaker_ids_openai_names_and_our_voice_names():
    assert parse_voices("0=af_bella, nova=am_adam,12=x") == {0: "af_bella", 7: "am_adam", 12: "x"}
    assert parse_voices("narrator=onyx", {"narrator": 5}) == {5: "onyx"}
    for bad in ("0", "=x", "bob=x"):
        with pytest.raises(ValueError):
            parse_voices(bad)


def test_remote_voice_names_come_from_the_references_voices_json(tmp_path, capsys):
    (tmp_path / "voices.json").write_text('{"5": {"path": "voices/5.wav", "text": "Hi.", "name": "narrator"}}')
    base = ["--engines", "remote", "--remote-url", "http://x/v1", "--references", str(tmp_path)]
    settings = load_settings([*base, "--remote-voices", "narrator=onyx,1=nova"], environ={}, dotenv_path=None)
    assert settings.remote_voice_map() == {5: "onyx", 1: "nova"}
    with pytest.raises(SystemExit):
        load_settings([*base, "--remote-voices", "villain=onyx"], environ={}, dotenv_path=None)
    assert "'villain'" in capsys.readouterr().err


def test_the_chain_comes_from_engines_or_from_the_engine_and_fallback_shorthands():
    def chain(*argv: str, **environ: str) -> list[str]:
        return load_settings(list(argv), environ=environ, dotenv_path=None).chain()

    assert chain() == ["csm", "piper"]
    assert chain("--fallback", "none") == ["csm"] and chain("--engine", "piper") == ["piper"]
    assert chain("--engines", "piper,csm") == ["piper", "csm"]
    assert chain(TTS_ENGINES="csm,remote,piper", TTS_REMOTE_URL="http://x/v1") == ["csm", "remote", "piper"]


def test_the_cache_counts_an_entrys_key_so_a_long_text_with_short_audio_is_not_nearly_free():
    cache = AudioCache(10**6)
    text = "\N{GRINNING FACE}" * 4000
    cache.put((text, 0), entry(3840))  # 80 ms of 24 kHz audio
    assert cache.bytes >= 3840 + 4 * 4000  # Python holds an emoji string in 4 bytes a character


@pytest.mark.parametrize("argv, says", [
    (["--engines", "csm,csm"], "twice"),
    (["--engines", "csm,gpt"], "list engines from"),
    (["--engines", "csm,remote"], "needs --remote-url"),
    (["--overflow-engine", "csm"], "must be an engine of the chain after the first"),
    (["--engines", "csm", "--overflow-engine", "piper"], "must be an engine of the chain after the first"),
    (["--engine-cost", "remote"], "ENGINE=USD_PER_MILLION_CHARS"),
    (["--remote-voices", "0"], "SPEAKER=REMOTE_VOICE"),
    (["--remote-languages", "english"], "not a language code"),
    (["--cache-mb", "-1"], "0 or more"),
])
def test_bad_chain_settings_stop_the_start_with_a_reason(argv, says, capsys):
    with pytest.raises(SystemExit):
        load_settings(argv, environ={}, dotenv_path=None)
    assert says in capsys.readouterr().err


def test_piper_voices_repeat_on_the_command_line_and_separate_with_commas_in_the_environment():
    settings = load_settings(["--piper-voice", "a.onnx", "--piper-voice", "voices/"], environ={}, dotenv_path=None)
    assert settings.piper_voice == ("a.onnx", "voices/")
    settings = load_settings([], environ={"TTS_PIPER_VOICE": "a.onnx,b.onnx", "TTS_ENGINE_COST": "remote=15,csm=0"},
                             dotenv_path=None)
    assert settings.piper_voice == ("a.onnx", "b.onnx") and settings.costs() == {"remote": 15.0, "csm": 0.0}


def test_the_remote_key_comes_from_the_environment_and_never_shows_in_the_settings():
    settings = load_settings(["--engines", "remote", "--remote-url", "http://x/v1"],
                             environ={"TTS_REMOTE_API_KEY": "sk-do-not-print"}, dotenv_path=None)
    assert settings.remote_api_key == "sk-do-not-print" and "sk-do-not-print" not in repr(settings)


def test_the_built_server_has_the_chain_overflow_cache_size_and_prices_the_settings_name():
    from tts_server.app import build_server

    settings = load_settings(["--engines", "piper,remote", "--remote-url", "http://127.0.0.1:9/v1",
                              "--overflow-engine", "remote", "--cache-mb", "0.5", "--engine-cost", "remote=15",
                              "--remote-voices", "0=af_bella", "--remote-languages", "en,de"],
                             environ={"TTS_REMOTE_API_KEY": "sk-test-key-77"}, dotenv_path=None)
    scheduler = build_server(settings).service.scheduler
    assert [slot.name for slot in scheduler.chain.slots] == ["piper", "remote"]
    assert scheduler.chain.overflow is scheduler.slots["remote"] and scheduler.cache.max_bytes == 2**19
    remote = scheduler.slots["remote"].engine
    assert remote.voice_for(0) == "af_bella" and remote.voice_for(7) == "nova" and remote.languages() == ("en", "de")
    assert scheduler.metrics.prices == {"remote": 15.0}
    assert "sk-test-key-77" not in repr(remote) + json.dumps(remote.describe())
