"""Fixtures for the eval tests: the data directory, the Qwen3 tokenizer and scripted servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.data import DATA_DIR, qwen3_tokenizer
from tests.eval.scripted_openai_server import Script, ScriptedServer


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """tests/data: real evaluation samples (tests/data/README.md), and the Qwen3 tokenizer unpacked."""
    qwen3_tokenizer()
    return DATA_DIR


@pytest.fixture(scope="session", name="qwen3_tokenizer")
def qwen3_tokenizer_fixture() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_tokenizer())


@pytest.fixture
def scripted_server() -> Iterator[Callable[..., ScriptedServer]]:
    """Start servers with `scripted_server(script, ...)`; all are stopped after the test."""
    servers: list[ScriptedServer] = []

    def start(script: Script, **kwargs: Any) -> ScriptedServer:
        servers.append(ScriptedServer(script, **kwargs).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()
