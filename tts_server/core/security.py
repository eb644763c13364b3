"""Who may connect and how much they may ask: API keys, origins, connection and rate limits.

- API keys are compared in constant time (``hmac.compare_digest`` against every
  configured key, no early exit).  Clients send ``Authorization: Bearer <key>``;
  browsers, which cannot set headers on a WebSocket, send ``?api_key=<key>``.
  ``/health`` and the page (its HTML, script and style) never need a key.  Keys never appear in logs, replies or metrics.
- Browsers send an ``Origin`` header; one that is not the server's own origin
  (``http(s)://<Host header>``) or listed in ``--allowed-origins`` is refused with
  403.  Clients that send no ``Origin`` (non-browser programs) are not affected.
- Connection limits (total, per client address) and a per-connection request
  rate (a token bucket) answer breaches with a stable error code and touch no
  one else.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit


def is_loopback(host: str) -> bool:
    """Whether a listening address only accepts this machine's clients."""
    return host in ("localhost", "::1") or host.startswith("127.")


@dataclass(frozen=True)
class Verdict:
    status: int  # 401 or 403
    reason: str


class Gate:
    """Decides, per HTTP request or WebSocket handshake, whether the caller may proceed."""

    def __init__(self, api_keys: tuple[str, ...] = (), allowed_origins: tuple[str, ...] = ()) -> None:
        self._keys = tuple(k.encode() for k in api_keys if k)
        self.allowed_origins = {o.rstrip("/") for o in allowed_origins if o}

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(k.decode() for k in self._keys)

    @property
    def requires_key(self) -> bool:
        return bool(self._keys)

    @staticmethod
    def offered_key(headers, path: str) -> str:
        """The key a request offers (``Authorization: Bearer``, else ``?api_key=``); empty when none."""
        auth = headers.get("Authorization", "")
        offered = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        return offered or (parse_qs(urlsplit(path).query).get("api_key") or [""])[0]

    def key_ok(self, headers, path: str) -> bool:
        if not self._keys:
            return True
        candidate = self.offered_key(headers, path).encode()
        matched = False
        for key in self._keys:  # no early exit: time does not depend on which key matched
            matched |= hmac.compare_digest(candidate, key)
        return matched

    def origin_ok(self, headers) -> bool:
        origin = headers.get("Origin")
        if origin is None or "*" in self.allowed_origins:
            return True
        origin = origin.rstrip("/")
        host = headers.get("Host", "")
        own = {f"http://{host}", f"https://{host}"} if host else set()
        return origin in own or origin in self.allowed_origins

    def check(self, headers, path: str, websocket: bool) -> Verdict | None:
        """``None`` to let the request through, else the status and a short reason."""
        bare = path.split("?", 1)[0]
        if bare == "/health" or bare.startswith("/static/") or (bare == "/" and not websocket):
            return None  # the page's HTML, script and style hold no data; the page asks for a key when refused
        if not self.key_ok(headers, path):
            return Verdict(401, "A valid API key is required: send 'Authorization: Bearer <key>', or add "
                                "?api_key=<key> to the address (the browser page: open /?api_key=<key>)\n")
        if websocket and not self.origin_ok(headers):
            return Verdict(403, "This Origin may not connect; see --allowed-origins\n")
        return None


class ProxyTrust:
    """The client's real address behind reverse proxies listed in ``--trusted-proxies``.

    A connection from a trusted proxy (nginx on this host, say) is counted under
    the address that proxy saw: the rightmost ``X-Forwarded-For`` entry that is
    not itself a trusted proxy.  Entries left of it were written by the client
    and are ignored, and a connection from any other address is counted under
    its own, so nobody can dodge the per-address limits by sending the header.
    """

    def __init__(self, proxies: tuple[str, ...] = ()) -> None:
        self.networks = tuple(ipaddress.ip_network(p, strict=False) for p in proxies if p)

    def trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)

    def client(self, peer: str, headers) -> str:
        if not self.trusted(peer):
            return peer
        chain = [a.strip() for h in headers.getlist("X-Forwarded-For") for a in h.split(",") if a.strip()]
        while chain and self.trusted(chain[-1]):
            peer = chain.pop()
        return chain[-1] if chain else peer


class ConnectionLimits:
    """Counts open connections, in total and per client address."""

    def __init__(self, total: int, per_address: int) -> None:
        self.total, self.per_address = total, per_address
        self._open: Counter[str] = Counter()

    def admit(self, address: str) -> str | None:
        """Register a connection, or return why it is refused."""
        if sum(self._open.values()) >= self.total:
            return f"The server has its maximum of {self.total} connections; retry shortly"
        if self._open[address] >= self.per_address:
            return f"Your address already has {self.per_address} connections open; close one first"
        self._open[address] += 1
        return None

    def release(self, address: str) -> None:
        self._open[address] -= 1
        if self._open[address] <= 0:
            del self._open[address]


class RateLimiter:
    """A token bucket: ``per_minute`` requests a minute on average, bursts up to the same number."""

    def __init__(self, per_minute: int, clock=time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._tokens = self.capacity
        self._clock = clock
        self._last = clock()

    def allow(self) -> bool:
        if self.available():
            self._tokens -= 1.0
            return True
        return False

    def available(self) -> bool:
        """Whether a request would be allowed now (nothing is taken)."""
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        return self._tokens >= 1.0


_CREDENTIALS = re.compile(r"(?i)(authorization[\"']?[:,]\s*[\"']?(?:\w+\s+)?|api_key=|[?&]session=|x-api-key[\"']?[:,]\s*[\"']?)"
                          r"[^&\s'\"]+")


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]+@")  # http://user:password@host


class RedactingFilter(logging.Filter):
    """Strips credentials from every record it sees: the ``Authorization`` header, ``?api_key=``, a session id in
    ``?session=`` (on a keyless server it is all a client needs to read a session), an address's user and password
    (httpx logs the chat model's URL at INFO) and every configured secret become ``***`` (uvicorn logs a
    WebSocket's path with its query at INFO, for one)."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def redact(self, text: str) -> str:
        text = _CREDENTIALS.sub(lambda m: m.group(1) + "***", text)
        text = _USERINFO.sub(r"\1***@", text)
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.redact(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def redact_logs(secrets: tuple[str, ...]) -> RedactingFilter:
    """Install one ``RedactingFilter`` on the root logger's handlers (every record that is written passes them)
    and on uvicorn's loggers (for handlers of their own)."""
    redacting = RedactingFilter(secrets)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redacting)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(redacting)
    return redacting
