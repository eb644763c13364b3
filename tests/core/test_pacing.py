"""The pace at which a connection may send the audio of its turns: a token bucket in seconds of audio (pure rule,
the clock passed in)."""

from __future__ import annotations

from tts_server.core.pacing import AUDIO_BURST_SECONDS, AUDIO_SPEED, AudioPace


def feed(pace: AudioPace, frame_s: float, speed: float, seconds: float, start: float = 0.0) -> tuple[int, int]:
    """Frames of ``frame_s`` sent at ``speed`` times real time for ``seconds`` of audio: (taken, refused)."""
    taken = refused = 0
    for i in range(round(seconds / frame_s)):
        if pace.take(frame_s, start + i * frame_s / speed):
            taken += 1
        else:
            refused += 1
    return taken, refused


def test_a_real_time_stream_is_always_taken_for_an_hour():
    assert feed(AudioPace(), 0.04, 1.0, 3600) == (90000, 0)


def test_a_stream_a_little_faster_than_real_time_is_taken_and_a_much_faster_one_is_not():
    assert feed(AudioPace(), 0.1, AUDIO_SPEED * 0.96, 600)[1] == 0
    taken, refused = feed(AudioPace(), 0.1, AUDIO_SPEED * 2, 600)
    assert refused > 0 and taken * 0.1 < 600 / 2 + AUDIO_BURST_SECONDS + 1


def test_the_burst_is_taken_at_once_then_the_next_frame_is_refused_and_costs_nothing():
    pace = AudioPace(burst_seconds=5, speed=1.25)
    assert [pace.take(1.0, 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert not pace.take(0.5, 0.0)  # refused frames did not deepen the debt
    assert pace.take(0.5, 0.4)  # 0.4 s later: 0.5 s of audio is back


def test_credit_never_grows_past_the_burst_however_long_the_connection_was_idle():
    pace = AudioPace(burst_seconds=5, speed=1.25)
    assert not pace.take(5.5, 3600.0)
    assert pace.take(5.0, 3600.0) and not pace.take(0.1, 3600.0)


def test_a_single_huge_frame_is_refused_on_a_full_bucket():
    assert not AudioPace().take(17 * 60, 0.0)  # 16 MiB of 16-bit PCM at 8 kHz
    assert AudioPace().take(AUDIO_BURST_SECONDS, 0.0)


def test_a_clock_that_goes_back_gives_no_credit():
    pace = AudioPace(burst_seconds=2, speed=1.25)
    assert pace.take(2.0, 100.0)
    assert not pace.take(0.5, 50.0) and not pace.take(0.5, 100.0)
