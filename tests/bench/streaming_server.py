"""A real OpenAI-compatible completions server on 127.0.0.1 that streams one chunk per token at known delays.

It records every request with its arrival and finish times, keeps vLLM-named prefix-cache counters as an ideal
token-level cache would (hits = the longest prefix the prompt shares with any earlier prompt), and serves /version
and /metrics like a mixquant server.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Listener(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 drops bursts of connections (see tests/eval)


@dataclass
class Received:
    body: dict[str, Any]
    arrived: float  # time.perf_counter() when the body had been read
    finished: float = 0.0  # just before the last byte was written

    @property
    def prompt(self) -> list[int]:
        return self.body["prompt"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class StreamingServer:
    """Streams `max_tokens` chunks per completion: the first after `first_token_delay_s`, then one per
    `token_delay_s`, then a usage chunk when asked. `fail(body)` may return an HTTP status to answer with instead,
    and `break_midway(body)` may end the stream with an error event after the first token.
    """

    def __init__(self, first_token_delay_s: float = 0.02, token_delay_s: float = 0.002,
                 precisions: dict[str, str] | None = None, with_metrics: bool = True,
                 fail: Callable[[dict[str, Any]], int | None] | None = None,
                 break_midway: Callable[[dict[str, Any]], bool] | None = None):
        self.first_token_delay_s = first_token_delay_s
        self.token_delay_s = token_delay_s
        self.precisions = precisions
        self.with_metrics = with_metrics
        self.fail = fail
        self.break_midway = break_midway  # requests that get one token, then an error event
        self.received: list[Received] = []
        # Counters that were already running before the benchmark started, so that only deltas are right.
        self.cache_queries = 5000
        self.cache_hits = 1234
        self._lock = threading.Lock()
        self._http = _Listener(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._http.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> StreamingServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()

    def _admit(self, body: dict[str, Any]) -> Received:
        received = Received(body, time.perf_counter())
        with self._lock:
            prompt = body["prompt"]
            self.cache_hits += max((_common_prefix(prompt, earlier.prompt) for earlier in self.received), default=0)
            self.cache_queries += len(prompt)
            self.received.append(received)
        return received

    def metrics_text(self) -> str:
        return (
            "# HELP vllm:prefix_cache_queries_total Prompt tokens looked up.\n"
            "# TYPE vllm:prefix_cache_queries_total counter\n"
            f'vllm:prefix_cache_queries_total{{model_name="scripted"}} {float(self.cache_queries)}\n'
            "# HELP vllm:prefix_cache_hits_total Prompt tokens found.\n"
            "# TYPE vllm:prefix_cache_hits_total counter\n"
            f'vllm:prefix_cache_hits_total{{model_name="scripted"}} {float(self.cache_hits)}\n'
        )

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            # Small writes a few milliseconds apart: Nagle's algorithm would hold them back and blur the timings.
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                if self.path == "/version":
                    extra = {"mixquant": server.precisions} if server.precisions else {}
                    self._send_json(200, {"version": "scripted-1", **extra})
                elif self.path == "/v1/models":
                    self._send_json(200, {"object": "list", "data": [{"id": "scripted", "object": "model"}]})
                elif self.path == "/metrics" and server.with_metrics:
                    self._send(200, "text/plain; version=0.0.4", server.metrics_text().encode())
                else:
                    self._send_json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/completions":
                    self._send_json(404, {"error": {"message": "not found"}})
                    return
                status = server.fail(body) if server.fail else None
                if status is not None:
                    self._send_json(status, {"error": {"message": "scripted failure"}})
                    return
                received = server._admit(body)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")  # HTTP/1.0: the stream ends when the connection does
                self.end_headers()
                with contextlib.suppress(ConnectionError):
                    time.sleep(server.first_token_delay_s)
                    tokens = body["max_tokens"]
                    for i in range(tokens):
                        if i:
                            time.sleep(server.token_delay_s)
                        choice = {"index": 0, "text": f" t{i}", "logprobs": None,
                                  "finish_reason": "length" if i == tokens - 1 else None}
                        self._event({"id": "cmpl-scripted", "object": "text_completion", "choices": [choice]})
                        if server.break_midway and server.break_midway(body):
                            self._event({"error": {"message": "engine died", "code": 503}})
                            break
                    if (body.get("stream_options") or {}).get("include_usage"):
                        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": tokens,
                                 "total_tokens": len(body["prompt"]) + tokens}
                        self._event({"id": "cmpl-scripted", "object": "text_completion", "choices": [],
                                     "usage": usage})
                    # Stamped before the last write, since the client may send its next request as soon as it reads it.
                    received.finished = time.perf_counter()
                    self.wfile.write(b"data: [DONE]\n\n")

            def _event(self, payload: dict[str, Any]) -> None:
                self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())

            def _send_json(self, status: int, payload: dict[str, Any]) -> None:
                self._send(status, "application/json", json.dumps(payload).encode())

            def _send(self, status: int, content_type: str, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(ConnectionError):
                    self.wfile.write(data)

            def log_message(self, *args: Any) -> None:  # keep the test output clean
                pass

        return Handler
