"""Servers on 127.0.0.1 for the tests: uvicorn in a background thread, serving a tiny model on the CPU."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from mixquant import tiny
from mixquant.config import EngineConfig
from mixquant.engine.llm_engine import LLMEngine
from mixquant.server.app import build_app
from mixquant.server.async_engine import AsyncEngine
from mixquant.server.config import ServerConfig

API_KEY = "test-key"
MODEL_NAME = "tiny-qwen3"


@dataclass
class RunningServer:
    url: str
    engine: LLMEngine
    async_engine: AsyncEngine
    api_key: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused", max_retries=0, timeout=60)

    def async_openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused", max_retries=0,
                                  timeout=120)


def tiny_engine(model: Path, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model), dtype="float32", device="cpu", **overrides))


def server_config(model: Path, **overrides) -> ServerConfig:
    settings = dict(served_model_names=[MODEL_NAME, "alias"], model_path=str(model), api_key=API_KEY,
                    reasoning_parser="qwen3", tool_call_parser="hermes", enable_auto_tool_choice=True,
                    max_request_bytes=1 << 20)
    settings.update(overrides)
    return ServerConfig(**settings)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (for a server started in another process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(engine, config: ServerConfig) -> Iterator[RunningServer]:
    app = build_app(engine, config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port before uvicorn listens
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(f"http://127.0.0.1:{sock.getsockname()[1]}", engine, app.state.engine, config.api_key)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="session")
def server(tiny_qwen3) -> Iterator[RunningServer]:
    """The shared server: real engine, Qwen3 reasoning and hermes tool parsers, an API key."""
    with running_server(tiny_engine(tiny_qwen3), server_config(tiny_qwen3)) as running:
        yield running


@pytest.fixture(scope="session")
def bundled_server() -> Iterator[RunningServer]:
    """The bundled mixquant-tiny (a model that writes tool calls and answers, which random weights never do) with the
    Qwen3 reasoning and hermes tool parsers and no API key."""
    path = tiny.bundled_model_path()
    config = server_config(path, served_model_names=[tiny.NAME], api_key=None)
    with running_server(tiny_engine(path), config) as running:
        yield running


@pytest.fixture
def client(server) -> openai.OpenAI:
    return server.openai()


@pytest.fixture
def http(server) -> Iterator[httpx.Client]:
    with server.http() as http_client:
        yield http_client
