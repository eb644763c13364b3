"""Streaming: exact chunked Mimi decoding, early first audio, cancellation, backpressure."""

from __future__ import annotations

import asyncio
import json
import socket

import numpy as np
import pytest
import torch
import websockets
from transformers import CsmForConditionalGeneration, MimiConfig, MimiModel

from conftest import collect, csm_slot, recv_json, reply_json, running_server, url
from tts_server.engines.mimi_stream import FRAME_SAMPLES, MimiStreamDecoder
from tts_server.engines.tiny_csm import randomize_codebooks

FRAME_BYTES = FRAME_SAMPLES * 2


def _decode_in_pieces(codec, codes: torch.Tensor, piece: int) -> torch.Tensor:
    decoder = MimiStreamDecoder(codec)
    return torch.cat([decoder.decode(codes[i:i + piece]) for i in range(0, codes.shape[0], piece)])


def _check_pieces_equal_whole(codec, frames: int, seed: int = 0) -> None:
    size = codec.config.codebook_size
    codes = torch.randint(0, size, (frames, 32), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        whole = codec.decode(codes.transpose(0, 1)[None]).audio_values[0, 0]
    for piece in (1, 2, 3, 7):
        pieces = _decode_in_pieces(codec, codes, piece)
        assert pieces.shape == whole.shape == (frames * FRAME_SAMPLES,)
        assert float((pieces - whole).abs().max()) < 1e-4, piece


@pytest.fixture(scope="module")
def tiny_codec(tiny_model_dir):
    return CsmForConditionalGeneration.from_pretrained(tiny_model_dir).codec_model.eval()


def test_tiny_codec_streams_exactly_past_its_attention_window(tiny_codec):
    # 150 frames = 300 transformer steps, beyond Mimi's 250-step sliding window.
    _check_pieces_equal_whole(tiny_codec, 150)


def test_full_size_random_codec_streams_exactly():
    torch.manual_seed(0)
    codec = MimiModel(MimiConfig()).eval()
    randomize_codebooks(codec)
    _check_pieces_equal_whole(codec, 12)


def _state_numel(decoder: MimiStreamDecoder) -> int:
    conv = sum(t.numel() for t in decoder._state.values())
    cache = sum(layer.keys.numel() + layer.values.numel() for layer in decoder._cache.layers)
    return conv + cache


def test_decoder_state_stays_constant_in_stream_length(tiny_codec):
    decoder = MimiStreamDecoder(tiny_codec)
    codes = torch.randint(0, 64, (400, 32), generator=torch.Generator().manual_seed(1))
    sizes = []
    for i in range(0, 400, 10):
        decoder.decode(codes[i:i + 10])
        sizes.append(_state_numel(decoder))
    assert sizes[-1] == sizes[15] > 0  # bounded once the window (125 frames) is full
    assert max(sizes) == sizes[-1]


async def test_first_chunk_after_two_frames_then_six_frame_chunks(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"text": "Streaming audio arrives early.", "stream": True,
                                      "max_audio_length_ms": 1600}))
            start = await recv_json(ws)
            sizes = []
            while isinstance(frame := await asyncio.wait_for(ws.recv(), 60), bytes):
                sizes.append(len(frame))
            done = reply_json(frame)
    assert start["status"] == "start" and start["format"] == "pcm" and start["sample_rate"] == 24000
    assert sizes[0] == 2 * FRAME_BYTES
    assert all(s == 6 * FRAME_BYTES for s in sizes[1:-1])
    assert sum(sizes) == 20 * FRAME_BYTES == done["length_bytes"]
    assert done["status"] == "success" and done["chunks"] == len(sizes) and done["ttfa_ms"] <= done["generation_s"] * 1000


async def test_streamed_samples_equal_the_non_streamed_wav(tiny_model_dir):
    text = "Two sentences here. And the second one continues the stream."
    common = {"text": text, "seed": 9, "context": False, "max_audio_length_ms": 3000}
    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({**common, "format": "wav"}))
            whole, wav, _ = await collect(ws)
            await ws.send(json.dumps({**common, "stream": True, "format": "pcm"}))
            streamed, pcm, _ = await collect(ws)
    wav_samples = np.frombuffer(wav[44:], dtype="<i2")
    pcm_samples = np.frombuffer(pcm, dtype="<i2")
    assert whole["status"] == streamed["status"] == "success"
    assert len(pcm_samples) == len(wav_samples) > 0
    assert np.abs(pcm_samples.astype(int) - wav_samples.astype(int)).max() <= 2


async def test_cancel_stops_a_running_stream_and_the_worker_moves_on(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"text": "A very long story. " * 30, "stream": True, "request_id": "long",
                                      "max_audio_length_ms": 90000}))
            assert (await recv_json(ws))["status"] == "start"
            assert isinstance(await ws.recv(), bytes)
            await ws.send(json.dumps({"type": "cancel", "request_id": "long"}))
            await ws.send(json.dumps({"text": "Next please", "request_id": "next", "max_audio_length_ms": 160}))
            reply, audio, _ = await collect(ws, "long")
            assert reply == {"status": "cancelled", "request_id": "long"}
            received = len(audio)
            nxt, _, others = await collect(ws, "next")
            assert nxt["status"] == "success"
            assert all(o.get("request_id") != "long" for o in others)
    assert received < 90 * 24000 * 2  # it did stop early
    stats = server.service.metrics.stats["csm"]
    assert stats.requests == 2


async def test_closing_the_connection_cancels_its_running_request(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir)) as server:
        ws = await websockets.connect(url(server))
        await ws.send(json.dumps({"text": "Talk for a long time. " * 30, "stream": True,
                                  "max_audio_length_ms": 90000}))
        assert (await recv_json(ws))["status"] == "start"
        await ws.close()
        async with websockets.connect(url(server)) as other:
            await other.send(json.dumps({"text": "My turn", "max_audio_length_ms": 160}))
            reply, _, _ = await collect(other)
        assert reply["status"] == "success"
        assert server.service.metrics.requests.labels("csm", "cancelled")._value.get() == 1


async def test_a_client_that_does_not_read_gets_client_too_slow_and_others_are_served(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir), stream_buffer_seconds=1) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.connect(("127.0.0.1", server.port))
        slow = await websockets.connect(url(server), sock=sock, max_queue=1)
        slow.transport.pause_reading()  # a client that stops reading its socket
        await slow.send(json.dumps({"text": "Lots of audio for a slow reader. " * 20, "stream": True,
                                    "max_audio_length_ms": 90000, "request_id": "slow"}))
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"text": "Meanwhile", "max_audio_length_ms": 160}))
            reply, _, _ = await collect(ws)
            assert reply["status"] == "success"
        slow.transport.resume_reading()
        reply, audio, _ = await collect(slow, "slow")
        await slow.close()
    assert reply["code"] == "client_too_slow" and reply["request_id"] == "slow"
    assert 0 < len(audio) < 90 * 24000 * 2


def test_a_clip_encoded_as_it_arrives_gives_the_codes_of_encoding_it_whole(tiny_model_dir):
    """Pieces of any size (under a frame, across frames) give the codes of one encode of the whole clip, both
    zero-padded to whole frames: a streamed turn costs only its last partial frame at its end."""
    from audio_fixtures import speechlike
    from tts_server.engines.base import ContextTurn
    from tts_server.engines.csm import CsmEngine

    engine = CsmEngine(lambda: tiny_model_dir, device="cpu")
    engine.load()
    clip = speechlike(2.3, seed=5)  # not a whole number of frames
    padded = np.pad(clip, (0, -len(clip) % FRAME_SAMPLES))
    whole = engine.codes_for(ContextTurn(1, "", padded))
    for sizes in ([len(clip)], [500] * 200, [1920, 7, 4000, 333, 100_000]):
        encoder, start = engine.stream_encoder(), 0
        for size in sizes:
            encoder.feed(torch.from_numpy(clip[start:start + size]))
            start += size
        streamed = encoder.finish()
        assert streamed.shape == whole.shape == (len(padded) // FRAME_SAMPLES, 32)
        assert torch.equal(streamed, whole), sizes
    other = engine.stream_encoder()
    other.feed(torch.from_numpy(speechlike(2.3, seed=6)))
    assert not torch.equal(other.finish(), whole)  # the comparison can fail
