"""Addresses and answers of the servers we call (the chat model, the remote engine), fit to show.

An operator may put credentials in an address (``http://user:password@host/v1``)
or a secret in its query (``?key=...``); what we show of it (``/v1/info``,
error replies, logs) never holds them.  What such a server answers when it
fails is its own text, which may hold anything (a stack trace, its own
secrets): users get its status and the status's reason phrase, never its body.
"""

from __future__ import annotations

import http
from urllib.parse import parse_qsl, urlsplit, urlunsplit

HIDDEN = "***"


def public_url(url: str) -> str:
    """``url`` without its user name and password, its query's values as ``***`` (their names stay: they say what
    was configured), and without a fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:  # not a URL we can take apart: show none of it
        return HIDDEN
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port is not None else "")
    query = "&".join(f"{name}={HIDDEN}" for name, _ in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def client_address(url: str) -> tuple[str, dict[str, str]]:
    """``url`` as the ``openai`` SDK takes it: the base address without its query, and the query apart (for
    ``default_query``).  The SDK appends its paths to the base as a string: a query left in it would come before
    the path (``/v1/?key=...chat/completions``)."""
    parts = urlsplit(url)
    return (urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")),
            dict(parse_qsl(parts.query, keep_blank_values=True)))


def url_secrets(url: str | None) -> tuple[str, ...]:
    """What ``public_url`` hides (user name, password, query values, fragment), for the log filter to hide too."""
    if not url:
        return ()
    try:
        parts = urlsplit(url)
        found = [parts.username, parts.password, parts.fragment, *(v for _, v in parse_qsl(parts.query))]
    except ValueError:
        found = [url]
    return tuple(s for s in found if s and len(s) >= 3)  # a one- or two-letter user name would blank out words


def scrub(text: str, url: str) -> str:
    """``text`` (an exception's message, say) with ``url``'s secrets replaced by ``***``."""
    for secret in url_secrets(url):
        text = text.replace(secret, HIDDEN)
    return text


def status_summary(status: int) -> str:
    """``HTTP 503 Service Unavailable``: what a user is told of a failed answer, in place of its body."""
    try:
        return f"HTTP {status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"
