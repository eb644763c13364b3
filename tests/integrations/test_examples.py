"""The examples build against the frameworks installed from PyPI (their APIs move between releases): the Pipecat
bot's pipeline with the packaged Whisper base, and the LiveKit agent's session.  Running them needs a microphone."""

from __future__ import annotations

import sys
from pathlib import Path

from pipecat.processors.frame_processor import FrameProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import livekit_agent  # noqa: E402
import pipecat_bot  # noqa: E402
from tts_server.integrations.livekit import TTS  # noqa: E402
from tts_server.integrations.pipecat import CSMTTSService, CSMUserTurns  # noqa: E402


def test_the_pipecat_bot_builds_its_pipeline_with_csm_hearing_the_user(whisper_dir):
    args = pipecat_bot.options(["--whisper", str(whisper_dir), "--session", "s-1", "--speaker", "3"])
    pipeline, tts = pipecat_bot.build(args, FrameProcessor(), FrameProcessor())
    kinds = [type(p).__name__ for p in pipeline.processors]
    assert isinstance(tts, CSMTTSService) and tts.session_id == "s-1" and tts.speaker == 3
    assert kinds.index("WhisperSTTService") < kinds.index("CSMUserTurns") < kinds.index("LLMUserAggregator")
    assert next(p for p in pipeline.processors if isinstance(p, CSMUserTurns)).tts is tts


async def test_the_livekit_agent_builds_a_session_that_speaks_through_csm():  # (LiveKit wants a running loop)
    config = {**livekit_agent.settings(), "llm_url": "http://127.0.0.1:9/v1", "stt_url": "http://127.0.0.1:9/v1",
              "session": "s-2"}
    session, agent = livekit_agent.build(config)
    assert isinstance(agent.tts, TTS) and agent.voice.session_id == "s-2"
    agent.heard(True)
    assert agent.frames.maxlen is None  # while the user speaks, all of it is kept
    agent.heard(False)
