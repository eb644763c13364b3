"""A Pipecat voice bot that speaks with CSM from this server, which hears both sides of the conversation.

Your microphone -> Silero VAD -> Whisper (faster-whisper, on this machine) -> any OpenAI-compatible LLM -> CSM
(this server: ``CSMTTSService``) -> your speakers.  ``CSMUserTurns`` sends your voice of each turn, with Whisper's
transcript, into the same session, so CSM answers in the context of how you spoke.  Interrupt it by speaking: the
session keeps only what you heard.

    python run_server.py --mode reuse --model-path ./csm-1b &        # the TTS server, on ws://127.0.0.1:8765
    pip install ".[pipecat]" "pipecat-ai[local,silero,whisper]"      # microphone/speakers (PyAudio), VAD, Whisper
    python examples/pipecat_bot.py --llm-url http://localhost:11434/v1 --llm-model llama3.2 --whisper base

``--whisper`` takes a model size (downloaded by faster-whisper) or a folder holding one, such as the packaged
Whisper base the tests lay out (``tests/audio_fixtures.lay_out_whisper_base``).  ``--session ID`` resumes a
conversation; the bot prints its session id when it starts.
"""

from __future__ import annotations

import argparse
import asyncio

from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineTask
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (LLMContextAggregatorPair,
                                                                   LLMUserAggregatorParams)
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.whisper.stt import WhisperSTTService

from tts_server.integrations.pipecat import CSMTTSService, CSMUserTurns

SYSTEM = "You are a friendly voice assistant. Answer in one to three short spoken sentences."


def build(args: argparse.Namespace, heard: FrameProcessor, played: FrameProcessor) -> tuple[Pipeline, CSMTTSService]:
    """The bot between a transport's input (``heard``) and output (``played``)."""
    stt = WhisperSTTService(device="cpu", compute_type="int8",
                            settings=WhisperSTTService.Settings(model=args.whisper))
    llm = OpenAILLMService(base_url=args.llm_url, api_key=args.llm_key,
                           settings=OpenAILLMService.Settings(model=args.llm_model))
    tts = CSMTTSService(url=args.tts_url, api_key=args.tts_key, session=args.session, speaker=args.speaker)
    context = LLMContextAggregatorPair(LLMContext([{"role": "system", "content": SYSTEM}]),
                                       user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer()))
    pipeline = Pipeline([heard, stt, CSMUserTurns(tts, speaker=args.user_speaker), context.user(), llm, tts,
                         played, context.assistant()])
    return pipeline, tts


def options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tts-url", default="ws://127.0.0.1:8765", help="this server's WebSocket")
    parser.add_argument("--tts-key", default=None, help="its --api-key, if it has one")
    parser.add_argument("--session", default=None, help="resume this session (else a new one)")
    parser.add_argument("--speaker", type=int, default=0, help="CSM's speaker id for the bot")
    parser.add_argument("--user-speaker", type=int, default=1, help="CSM's speaker id for you")
    parser.add_argument("--llm-url", default="http://localhost:11434/v1", help="an OpenAI-compatible API")
    parser.add_argument("--llm-key", default="none")
    parser.add_argument("--llm-model", default="llama3.2")
    parser.add_argument("--whisper", default="base", help="a faster-whisper model size or folder")
    return parser.parse_args(argv)


async def main() -> None:
    from pipecat.transports.local.audio import LocalAudioTransport, LocalAudioTransportParams

    args = options()
    transport = LocalAudioTransport(LocalAudioTransportParams(audio_in_enabled=True, audio_out_enabled=True))
    pipeline, tts = build(args, transport.input(), transport.output())
    task = PipelineTask(pipeline)

    @tts.event_handler("on_connected")
    async def said_hello(service: CSMTTSService) -> None:
        print(f"Speaking with CSM in session {service.session_id} (resume it with --session)")

    await PipelineRunner().run(task)


if __name__ == "__main__":
    asyncio.run(main())
