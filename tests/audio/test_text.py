"""Sentences out of streamed text (an LLM's reply arriving over Wyoming): nothing lost, nothing too long, no waiting."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tts_server.audio.text import SentenceStream, reads_unfinished, split_sentences

WORDS = st.lists(st.sampled_from(["Hello", "there,", "friend.", "How", "are", "you?", "I'm", "fine!", "3.5", "ok;",
                                  "averyveryverylongwordwithoutanyend", "\n", "well", "…", "yes."]), max_size=120)


@settings(max_examples=200, deadline=None)
@given(words=WORDS, cuts=st.lists(st.integers(0, 2000), max_size=30), max_chars=st.sampled_from([40, 250]),
       first_phrase=st.booleans())
def test_any_chunking_speaks_every_word_once_in_pieces_that_fit(words, cuts, max_chars, first_phrase):
    text = " ".join(words)
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    stream = SentenceStream(max_chars=max_chars, first_phrase=first_phrase)
    pieces = [s for a, b in zip(bounds, bounds[1:]) for s in stream.add(text[a:b])] + stream.finish()
    assert "".join("".join(pieces).split()) == "".join(text.split())  # every character, in order (a hard cut
    # may split a word longer than a piece)
    assert all(0 < len(piece) <= max_chars for piece in pieces)


def test_a_sentence_is_released_once_the_next_is_long_enough_not_to_join_it():
    stream = SentenceStream()
    assert stream.add("The weather to") == []
    assert stream.add("day is sunny and warm.") == []  # the period may still be a decimal point or an abbreviation
    assert stream.add(" Tomorrow") == []  # "Tomorrow." alone would join it, as in whole text
    assert stream.add(" it rains") == ["The weather today is sunny and warm."]
    assert stream.finish() == ["Tomorrow it rains"]


STREAMED = st.lists(st.sampled_from(["Hello", "there,", "friend.", "you?", "fine!", "3.5", "ok;", '"quoted."', "(yes.)",
                                     "end.)", 'so."', "x]", "Dr.", "e.g.", "$12.50", "…", "—", "\n", "  ", "a",
                                     "averyveryverylongwordwithoutanyend"]), max_size=80)


@settings(max_examples=300, deadline=None)
@given(words=STREAMED, glue=st.sampled_from([" ", "", "\n", "  "]), cuts=st.lists(st.integers(0, 4000), max_size=40),
       max_chars=st.sampled_from([30, 40, 250]))
def test_streamed_text_is_cut_into_exactly_the_sentences_of_the_whole_text(words, glue, cuts, max_chars):
    """The same generations as the text sent whole, however it is cut (mid-word, mid-number, between a period and
    its closing quote), so a text stream's seeded audio is the whole text's."""
    text = glue.join(words)
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    stream = SentenceStream(max_chars=max_chars)
    pieces = [s for a, b in zip(bounds, bounds[1:]) for s in stream.add(text[a:b])] + stream.finish()
    assert pieces == split_sentences(text, max_chars=max_chars)


def test_short_fragments_wait_for_the_next_sentence_as_in_whole_text():
    stream = SentenceStream()
    spoken = stream.add("Hi. How are you doing today? ") + stream.finish()
    assert spoken == split_sentences("Hi. How are you doing today?") == ["Hi. How are you doing today?"]


def test_a_run_on_without_an_end_is_cut_before_it_outgrows_a_generation():
    stream = SentenceStream(max_chars=30)
    spoken = stream.add("one two three four five six seven eight nine ten eleven ")
    assert spoken and all(len(s) <= 30 for s in spoken) and len(stream.pending) <= 30


def test_aligner_pieces_become_times_for_each_whitespace_word():
    from tts_server.audio.text import place_words

    words = "Hello, world! I have 42 apples.".split()
    pieces = [(" Hello", 0.0, 0.4), (",", 0.4, 0.45), (" world", 0.5, 0.9), ("!", 0.9, 0.95), (" I", 1.2, 1.3),
              (" have", 1.3, 1.6), (" 4", 1.6, 1.8), ("2", 1.8, 2.1), (" apples", 2.1, 2.6), (".", 2.6, 2.7)]
    assert place_words(words, pieces) == [(0.0, 0.45), (0.5, 0.95), (1.2, 1.3), (1.3, 1.6), (1.6, 2.1),
                                          (2.1, 2.7)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="ab,.", min_size=1, max_size=4), min_size=1, max_size=8),
       st.lists(st.floats(0, 2), min_size=1, max_size=12))
def test_placed_words_never_go_backwards_whatever_the_pieces(words, steps):
    from tts_server.audio.text import place_words

    text = "".join(words)
    cuts = sorted({min(len(text), round(i * len(text) / len(steps))) for i in range(len(steps) + 1)})
    times = [sum(steps[:i]) for i in range(len(cuts))]
    pieces = [(text[a:b], times[i], times[i + 1]) for i, (a, b) in enumerate(zip(cuts, cuts[1:])) if b > a]
    placed = place_words(words, pieces)
    flat = [t for span in placed for t in span]
    assert len(placed) == len(words) and flat == sorted(flat)


def test_captions_group_words_into_timed_cues():
    from tts_server.audio.captions import srt, vtt

    words = [{"word": w, "start_s": i * 0.3, "end_s": i * 0.3 + 0.25} for i, w in
             enumerate("One two three. Four five six seven eight nine ten eleven twelve.".split())]
    assert vtt(words).startswith("WEBVTT\n\n1\n00:00:00.000 --> 00:00:00.850\nOne two three.\n\n2\n00:00:00.900")
    cues = srt(words).strip().split("\n\n")
    assert [c.split("\n")[2] for c in cues] == ["One two three.", "Four five six seven eight nine ten eleven",
                                                "twelve."]
    assert cues[1].split("\n")[1] == "00:00:00,900 --> 00:00:03,250"


def test_an_answer_starts_at_its_first_phrase_then_goes_sentence_by_sentence():
    stream = SentenceStream(first_phrase=True)
    pieces = [p for word in "Once upon a time, a small boat sailed far away. It found an island, full of birds. "
              .split(" ") for p in stream.add(word + " ")]
    assert pieces + stream.finish() == ["Once upon a time,", "a small boat sailed far away.",
                                        "It found an island, full of birds."]
    assert SentenceStream(first_phrase=True).add("Well, I think so. ") == ["Well, I think so."]  # one word waits
    assert SentenceStream(first_phrase=True).add("Let me see - the answer is ") == ["Let me see -"]
    assert SentenceStream().add("Once upon a time, a small boat ") == []  # sentences only, without it


def test_a_transcript_that_trails_off_or_ends_on_a_word_that_goes_on_reads_unfinished():
    unfinished = ["I went to the shop and", "I would like to", "A table for", "My favorite color is green,",
                  "Let me think...", "Tell me about the."]
    finished = ["Book a table for two.", "Where are you going to?", "Yes.", "What time is it?", "Stop!", ""]
    assert all(reads_unfinished(text) for text in unfinished)
    assert not any(reads_unfinished(text) for text in finished)
    assert reads_unfinished("Ich gehe zum Laden,", "de") and not reads_unfinished("Ich gehe und", "de")
