"""Captions of hostile texts read back by strict parsers (webvtt-py, srt): every cue keeps its time and shows the
words that were spoken, and no text becomes markup, a timing line or a cue of its own."""

from __future__ import annotations

import html
import io

import pytest

from tts_server.audio.captions import cues, srt, vtt

HOSTILE = [
    "Use a --> b and <b>bold</b> & R&D",
    "00:00:01.000 --> 00:00:02.000",
    "00:00:01,000 --> 00:00:02,000 and then 3 00:00:05,000 --> 00:00:09,000",
    "<i>italic</i> {\\an8}up {\\i1}there <c.red>red</c> <00:00:01.000> &amp; &lt;b&gt; WEBVTT NOTE",
    "1 --> 2 <v Bob>spoof</v> <ruby>x<rt>y</rt></ruby> ->> --!> a>b<c",
]


def timed(text: str) -> list[dict]:
    return [{"word": word, "start_s": 0.3 * i, "end_s": 0.3 * i + 0.25} for i, word in enumerate(text.split())]


@pytest.mark.parametrize("text", HOSTILE)
def test_webvtt_cues_of_hostile_text_parse_to_the_spoken_words_at_their_times(text):
    import webvtt

    made = cues(timed(text))
    parsed = webvtt.from_buffer(io.StringIO(vtt(timed(text))))
    assert [html.unescape(cue.text) for cue in parsed] == [cue_text for _, _, cue_text in made]
    assert [cue.start_in_seconds + cue.start_time.milliseconds / 1000 for cue in parsed] == \
        pytest.approx([start for start, _, _ in made])
    assert "<" not in "".join(cue.raw_text for cue in parsed)  # no markup at all: nothing for a player to render


@pytest.mark.parametrize("text", HOSTILE)
def test_srt_cues_of_hostile_text_parse_to_the_spoken_words_with_no_markup_or_forged_timing(text):
    import srt as srt_parser

    made = cues(timed(text))
    parsed = list(srt_parser.parse(srt(timed(text))))
    # a word joiner (U+2060, invisible) after "<", "{" and inside "-->" keeps players from reading tags and
    # timings; the words shown are the words spoken
    assert [sub.content.replace("\u2060", "") for sub in parsed] == [cue_text for _, _, cue_text in made]
    assert [sub.start.total_seconds() for sub in parsed] == pytest.approx([start for start, _, _ in made])
    for sub in parsed:
        assert "-->" not in sub.content and "\n" not in sub.content
        assert all(tag not in sub.content for tag in ("<b>", "<i>", "</", "{\\"))
