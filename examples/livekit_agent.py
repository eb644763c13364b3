"""A LiveKit voice agent that speaks with CSM from this server, which hears both sides of the conversation.

The agent (LiveKit Agents) hears you through its STT and VAD, answers with any OpenAI-compatible LLM, and speaks
through ``tts_server.integrations.livekit.TTS``: every answer is one streamed reply in the agent's session, spoken
in the context of the conversation's audio.  Your voice of each turn joins that session too (``TTS.user_turn``:
the audio LiveKit hands to ``stt_node`` while you speak, with the transcript it hands to
``on_user_turn_completed``).  Interrupt it by speaking: the session keeps only what was played.

    python run_server.py --mode reuse --model-path ./csm-1b &         # the TTS server, on ws://127.0.0.1:8765
    pip install ".[livekit]" livekit-plugins-openai livekit-plugins-silero
    CSM_LLM_URL=http://localhost:11434/v1 CSM_LLM_MODEL=llama3.2 CSM_STT_URL=http://localhost:8000/v1 \\
        python examples/livekit_agent.py console                        # your microphone and speakers

``console`` runs in the terminal with no LiveKit server; ``dev`` joins rooms of the LiveKit server named by
``LIVEKIT_URL``, ``LIVEKIT_API_KEY`` and ``LIVEKIT_API_SECRET``.  LiveKit has no plugin that runs Whisper in
process, so speech recognition is any OpenAI-compatible transcription API (``CSM_STT_URL``, e.g. a local
faster-whisper server); the other ``CSM_*`` variables are read in ``settings()``.
"""

from __future__ import annotations

import collections
import os
from typing import AsyncIterable

from livekit import rtc
from livekit.agents import Agent, AgentSession, JobContext, WorkerOptions, cli, llm
from livekit.plugins import openai, silero

from tts_server.integrations.livekit import TTS

SYSTEM = "You are a friendly voice assistant. Answer in one to three short spoken sentences."
PRE_ROLL_FRAMES = 50  # ~0.5 s of 10 ms frames kept from before the VAD says you started speaking


def settings() -> dict[str, str | None]:
    return {"tts_url": os.environ.get("CSM_TTS_URL", "ws://127.0.0.1:8765"), "tts_key": os.environ.get("CSM_TTS_KEY"),
            "session": os.environ.get("CSM_SESSION"), "llm_url": os.environ.get("CSM_LLM_URL"),
            "llm_model": os.environ.get("CSM_LLM_MODEL", "llama3.2"), "llm_key": os.environ.get("CSM_LLM_KEY", "none"),
            "stt_url": os.environ.get("CSM_STT_URL"), "stt_model": os.environ.get("CSM_STT_MODEL", "whisper-1")}


class CSMAgent(Agent):
    """Keeps your audio while you speak and gives it, with its transcript, to CSM's session at each turn's end."""

    def __init__(self, voice: TTS) -> None:
        super().__init__(instructions=SYSTEM, tts=voice)
        self.voice = voice
        self.speaking = False
        self.frames: collections.deque[rtc.AudioFrame] = collections.deque(maxlen=PRE_ROLL_FRAMES)

    def heard(self, speaking: bool) -> None:
        """The user's state changed (the session's ``user_state_changed``): keep everything while they speak."""
        if speaking and not self.speaking:
            self.frames = collections.deque(self.frames)  # the pre-roll, now without a bound
        self.speaking = speaking

    async def stt_node(self, audio: AsyncIterable[rtc.AudioFrame], model_settings):
        async def tap():
            async for frame in audio:
                self.frames.append(frame)
                yield frame
        return Agent.default.stt_node(self, tap(), model_settings)

    async def on_user_turn_completed(self, turn_ctx: llm.ChatContext, new_message: llm.ChatMessage) -> None:
        frames, self.frames = list(self.frames), collections.deque(maxlen=PRE_ROLL_FRAMES)
        if frames:
            await self.voice.user_turn(frames, new_message.text_content)


def build(config: dict[str, str | None]) -> tuple[AgentSession, CSMAgent]:
    voice = TTS(url=config["tts_url"], api_key=config["tts_key"], session=config["session"])
    session = AgentSession(vad=silero.VAD.load(),
                           stt=openai.STT(base_url=config["stt_url"], model=config["stt_model"], api_key="none"),
                           llm=openai.LLM(base_url=config["llm_url"], model=config["llm_model"],
                                          api_key=config["llm_key"]))
    agent = CSMAgent(voice)
    session.on("user_state_changed", lambda event: agent.heard(event.new_state == "speaking"))
    return session, agent


async def entrypoint(ctx: JobContext) -> None:
    session, agent = build(settings())
    await session.start(agent=agent, room=ctx.room)


if __name__ == "__main__":
    cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint))
