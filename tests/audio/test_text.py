"""Sentences out of streamed text (an LLM's reply arriving over Wyoming): nothing lost, nothing too long, no waiting."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tts_server.audio.text import SentenceStream, split_sentences

WORDS = st.lists(st.sampled_from(["Hello", "there,", "friend.", "How", "are", "you?", "I'm", "fine!", "3.5", "ok;",
                                  "averyveryverylongwordwithoutanyend", "\n", "well", "…", "yes."]), max_size=120)


@settings(max_examples=200, deadline=None)
@given(words=WORDS, cuts=st.lists(st.integers(0, 2000), max_size=30), max_chars=st.sampled_from([40, 250]))
def test_any_chunking_speaks_every_word_once_in_pieces_that_fit(words, cuts, max_chars):
    text = " ".join(words)
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    stream = SentenceStream(max_chars=max_chars)
    pieces = [s for a, b in zip(bounds, bounds[1:]) for s in stream.add(text[a:b])] + stream.finish()
    assert "".join("".join(pieces).split()) == "".join(text.split())  # every character, in order (a hard cut
    # may split a word longer than a piece)
    assert all(0 < len(piece) <= max_chars for piece in pieces)


def test_a_sentence_is_released_as_soon_as_the_next_one_begins():
    stream = SentenceStream()
    assert stream.add("The weather to") == []
    assert stream.add("day is sunny and warm.") == []  # the period may still be a decimal point or an abbreviation
    assert stream.add(" Tomorrow") == ["The weather today is sunny and warm."]
    assert stream.finish() == ["Tomorrow"]


def test_short_fragments_wait_for_the_next_sentence_as_in_whole_text():
    stream = SentenceStream()
    spoken = stream.add("Hi. How are you doing today? ") + stream.finish()
    assert spoken == split_sentences("Hi. How are you doing today?") == ["Hi. How are you doing today?"]


def test_a_run_on_without_an_end_is_cut_before_it_outgrows_a_generation():
    stream = SentenceStream(max_chars=30)
    spoken = stream.add("one two three four five six seven eight nine ten eleven ")
    assert spoken and all(len(s) <= 30 for s in spoken) and len(stream.pending) <= 30
