"""The integrations' shared client: a framework's voice setting as CSM's speaker id."""

from __future__ import annotations

import pytest

from tts_server.integrations.livekit import TTS
from tts_server.integrations.pipecat import CSMTTSService
from tts_server.integrations.wire import speaker_of


def test_a_voice_setting_is_a_speaker_id_or_an_openai_voice_name_numbered_as_the_servers_openai_api():
    assert [speaker_of(v) for v in (0, "7", "alloy", "Ash", "cedar", 1_000_000)] == [0, 7, 0, 1, 12, 1_000_000]
    for bad in ("narrator", "-1", "３", 1_000_001, -2, "", "1.5"):
        with pytest.raises(ValueError):
            speaker_of(bad)
    assert CSMTTSService(url="ws://127.0.0.1:9", speaker="ash").speaker == 1
    assert TTS(url="ws://127.0.0.1:9", speaker="nova").speaker == 7
    with pytest.raises(ValueError):
        CSMTTSService(url="ws://127.0.0.1:9", speaker="narrator")
