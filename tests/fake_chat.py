"""A chat-completions server for tests, speaking OpenAI's streamed wire format (server-sent events of
``chat.completion.chunk`` objects, then ``data: [DONE]``), so the server's real ``openai`` client is what reads it.

It answers every request with ``reply``, a word per event, the first after ``first`` seconds (an LLM's time to
first token) and the rest ``delay`` seconds apart; it records each request body
and when each answer's stream started and finished (``time.time()``).  ``key`` set: other keys get OpenAI's 401.
``error`` (status, body) answers every request with that status and body, as a failing server would.
``idle`` set: after ``reply`` the stream never ends, sending every ``idle`` seconds what carries no text (an empty
delta, a reasoning token, a chunk without choices, an SSE comment), as keep-alives and thinking models do, until
the client hangs up (``hung_up``).  ``raw`` set: the stream is those ``data:`` payloads as they are (malformed ones,
say), then ``[DONE]``.  ``paths`` records each request's path and query.
"""

from __future__ import annotations

import http.server
import itertools
import json
import threading
import time


class FakeChat:
    def __init__(self, reply: str, delay: float = 0.0, key: str | None = None, first: float = 0.0,
                 error: tuple[int, str] | None = None, idle: float | None = None, raw: list[str] | None = None) -> None:
        self.reply, self.delay, self.key, self.first = reply, delay, key, first
        self.error, self.idle, self.raw = error, idle, raw
        self.requests: list[dict] = []
        self.paths: list[str] = []
        self.started: list[float] = []
        self.finished: list[float] = []
        self.hung_up = threading.Event()  # a client closed the stream before its end
        self.hangups = 0  # how many streams a client closed before their end
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                owner.requests.append(body)
                owner.paths.append(self.path)
                if owner.key is not None and self.headers.get("authorization") != f"Bearer {owner.key}":
                    return self._refuse(401, json.dumps({"error": {"message": "Incorrect API key provided", "type":
                                                         "invalid_request_error", "code": "invalid_api_key"}}))
                if owner.error is not None:
                    return self._refuse(*owner.error)
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                owner.started.append(time.time())
                if owner.raw is not None:
                    for payload in owner.raw:
                        self._event(f"data: {payload}\n\n")
                    self._event("data: [DONE]\n\n")
                    self.wfile.write(b"0\r\n\r\n")
                    return self.wfile.flush()
                words = owner.reply.split(" ")
                deltas = [{"role": "assistant", "content": ""}] + \
                    [{"content": w if i == 0 else " " + w} for i, w in enumerate(words)] + [{}]
                try:
                    for i, delta in enumerate(deltas[:-1] if owner.idle is not None else deltas):
                        if i > 0:
                            time.sleep(owner.first if i == 1 else owner.delay)
                        self._chunk(body, [{"index": 0, "delta": delta, "finish_reason": "stop" if not delta else None}])
                    for i in itertools.count() if owner.idle is not None else ():
                        time.sleep(owner.idle)
                        if i % 4 == 3:
                            self._event(": keep-alive\n\n")
                        else:
                            self._chunk(body, [] if i % 4 == 2 else [{"index": 0, "finish_reason": None, "delta": (
                                {"content": ""} if i % 4 == 0 else {"content": None, "reasoning_content": "hmm"})}])
                    self._event("data: [DONE]\n\n")
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                    owner.finished.append(time.time())
                except OSError:
                    owner.hangups += 1
                    owner.hung_up.set()

            def _refuse(self, status: int, body: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _chunk(self, body: dict, choices: list) -> None:
                chunk = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": body.get("model", ""), "choices": choices}
                self._event(f"data: {json.dumps(chunk)}\n\n")

            def _event(self, text: str) -> None:
                data = text.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FakeChat":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
