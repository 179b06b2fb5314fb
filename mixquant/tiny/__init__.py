"""`mixquant-tiny`: the small Qwen3-architecture model that ships inside the package and is served by default.

Trained from scratch on the seeded synthetic agentic tasks of `mixquant.tiny.tasks`, with its own tokenizer, by the
repository's training/ folder (not installed with the package). See checkpoint/README.md for what it can do.
"""
from __future__ import annotations

from pathlib import Path

NAME = "mixquant-tiny"


def bundled_model_path() -> Path:
    """The checkpoint folder inside the installed package."""
    return Path(__file__).parent / "checkpoint"
