"""Pure rules of the chat model's side: the prompt's character budget, and addresses and errors fit to show."""

from __future__ import annotations

import logging

from tts_server.core.respond import PROMPT_CHARS, chat_messages
from tts_server.core.security import RedactingFilter
from tts_server.engines.addresses import public_url, status_summary, url_secrets
from tts_server.engines.base import ContextTurn


def said(speaker: int, text: str) -> ContextTurn:
    return ContextTurn(speaker, text, None, {})


def test_the_prompt_keeps_the_newest_whole_turns_within_the_budget_and_drops_the_oldest_first():
    transcript = [said(1, "a" * 40), said(0, "First sentence."), said(0, "Second one."), said(1, "b" * 30),
                  said(1, "c" * 10)]
    assert chat_messages(transcript, 0, budget=70) == [
        {"role": "assistant", "content": "First sentence. Second one."},  # an answer's sentences, joined
        {"role": "user", "content": "b" * 30 + " " + "c" * 10}]
    assert chat_messages(transcript, 0, budget=10_000)[0] == {"role": "user", "content": "a" * 40}
    assert sum(len(m["content"]) for m in chat_messages(transcript * 500, 0)) <= PROMPT_CHARS


def test_a_newest_turn_longer_than_the_budget_is_cut_to_its_end():
    assert chat_messages([said(1, "old"), said(1, "x" * 50 + "end")], 0, budget=20) == [
        {"role": "user", "content": "x" * 17 + "end"}]


def test_addresses_are_shown_without_credentials_or_query_secrets():
    url = "https://ada:hunter2@chat.example:8443/v1?key=sk-123&api-version=2024#frag"
    assert public_url(url) == "https://chat.example:8443/v1?key=***&api-version=***"
    assert public_url("http://[::1]:11434/v1") == "http://[::1]:11434/v1"
    assert public_url("http://host:notaport/v1") == "***"
    assert set(url_secrets(url)) == {"ada", "hunter2", "sk-123", "2024", "frag"}
    assert status_summary(503) == "HTTP 503 Service Unavailable" and status_summary(599) == "HTTP 599"


def test_logged_addresses_lose_their_user_and_password():
    record = logging.LogRecord("httpx2", logging.INFO, __file__, 1, 'HTTP Request: POST %s "HTTP/1.1 200 OK"',
                               ("http://ada:hunter2@127.0.0.1:9/v1/chat/completions",), None)
    RedactingFilter(url_secrets("http://ada:hunter2@127.0.0.1:9/v1?key=sk-123")).filter(record)
    assert record.getMessage() == 'HTTP Request: POST http://***@127.0.0.1:9/v1/chat/completions "HTTP/1.1 200 OK"'
