"""Fixtures for the eval tests: the shared data directory, the Qwen3 tokenizer and scripted servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.eval.scripted_openai_server import Script, ScriptedServer

# CI clones the repository with shared/ beside it.
DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    # No skip: CI always has the data, so its absence is a broken checkout that must not pass silently.
    if not DATA_DIR.is_dir():
        pytest.fail(f"the evaluation data is missing: expected {DATA_DIR} (../shared/data beside the repository)")
    return DATA_DIR


@pytest.fixture(scope="session")
def qwen3_tokenizer(data_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(data_dir / "qwen3-tokenizer")


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
