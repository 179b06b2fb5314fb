"""A real OpenAI-compatible HTTP server on 127.0.0.1 that answers chat completions from a test's script."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Listener(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops connections when a run opens dozens at once (they come back only
    # after a one-second SYN retry), which would make the tests slow for no reason of ours.
    request_queue_size = 256


@dataclass
class Reply:
    """What the script answers one chat request with."""

    content: str = ""
    reasoning: str | None = None
    status: int = 200
    retry_after: str | None = None
    completion_tokens: int = 7


Script = Callable[[dict[str, Any]], Reply]


class ScriptedServer:
    """A real HTTP server on 127.0.0.1 speaking the OpenAI chat API, answering from a test's script.

    It records every chat request and the most requests it ever had in flight at once.
    """

    def __init__(self, script: Script, latency_s: float = 0.02, precisions: dict[str, str] | None = None):
        self.script = script
        self.latency_s = latency_s  # long enough that concurrent requests overlap
        self.precisions = precisions
        self.requests: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._http = _Listener(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._http.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}"

    def prompts(self) -> list[str]:
        return [request["messages"][-1]["content"] for request in self.requests]

    def start(self) -> ScriptedServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()

    def _chat(self, body: dict[str, Any], authorization: str | None) -> tuple[int, dict[str, str], dict[str, Any]]:
        with self._lock:
            self.requests.append(body)
            self.authorizations.append(authorization)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.latency_s)
            reply = self.script(body)
        finally:
            with self._lock:
                self.in_flight -= 1
        if reply.status != 200:
            headers = {"Retry-After": reply.retry_after} if reply.retry_after is not None else {}
            return reply.status, headers, {"error": {"message": "scripted failure"}}
        message = {"role": "assistant", "content": reply.content, "reasoning_content": reply.reasoning}
        return (
            200,
            {},
            {
                "id": "chatcmpl-scripted",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 11, "completion_tokens": reply.completion_tokens, "total_tokens": 0},
            },
        )

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                extra = {"mixquant": server.precisions} if server.precisions else {}
                if self.path == "/v1/models":
                    self._send(200, {}, {"object": "list", "data": [{"id": "scripted", "object": "model", **extra}]})
                elif self.path == "/version":
                    self._send(200, {}, {"version": "scripted-1", **extra})
                else:
                    self._send(404, {}, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    self._send(404, {}, {"error": {"message": "not found"}})
                    return
                self._send(*server._chat(body, self.headers.get("Authorization")))

            def _send(self, status: int, headers: dict[str, str], payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                with contextlib.suppress(ConnectionError):  # the client gave up on it (a run stopping early)
                    self.wfile.write(data)

            def log_message(self, *args: Any) -> None:  # keep the test output clean
                pass

        return Handler


class FailFirst:
    """Fails the first `times` requests for each prompt that `selects` with `status`, then lets them through."""

    def __init__(
        self, selects: Callable[[str], bool], times: int = 1, status: int = 500, retry_after: str | None = None
    ):
        self.selects = selects
        self.times = times
        self.failure = Reply(status=status, retry_after=retry_after)
        self.failures: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, prompt: str) -> Reply | None:
        """The failure to answer with, or None when this request goes through."""
        if not self.selects(prompt):
            return None
        with self._lock:
            if self.failures[prompt] >= self.times:
                return None
            self.failures[prompt] += 1
        return self.failure
