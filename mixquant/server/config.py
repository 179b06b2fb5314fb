"""What the HTTP layer needs to know beyond the engine: names, keys, parsers, limits, chat template and defaults."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mixquant.engine.llm_engine import GENERATION_DEFAULT_KEYS
from mixquant.server.parsers import REASONING_PARSERS, TOOL_CALL_PARSERS


@dataclass
class ServerConfig:
    served_model_names: list[str]
    model_path: str  # reported as the model's `root` in /v1/models
    api_key: str | None = None
    chat_template: str | None = None  # a Jinja template that replaces the tokenizer's own
    default_chat_template_kwargs: dict = field(default_factory=dict)
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    # Sampling defaults for fields a request leaves out (generation_config.json, as vLLM applies them).
    generation_defaults: dict = field(default_factory=dict)
    max_logprobs: int = 20
    # Requests the server holds at once (running or waiting for the engine); more are answered 503.
    max_pending_requests: int = 8192  # high enough for benchmark clients that send everything at once
    max_request_bytes: int = 32 << 20
    # Responses kept for previous_response_id (in memory, the oldest evicted first).
    max_stored_responses: int = 1024

    def __post_init__(self):
        if not self.served_model_names:
            raise ValueError("at least one served model name is needed")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {self.reasoning_parser!r}; "
                             f"choose one of: {', '.join(REASONING_PARSERS)}")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"unknown tool call parser {self.tool_call_parser!r}; "
                             f"choose one of: {', '.join(TOOL_CALL_PARSERS)}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
        unknown = set(self.generation_defaults) - set(GENERATION_DEFAULT_KEYS)
        if unknown:
            raise ValueError(f"generation defaults may only set {', '.join(GENERATION_DEFAULT_KEYS)}; "
                             f"got {', '.join(sorted(unknown))}")
        for name in ("max_pending_requests", "max_request_bytes", "max_stored_responses"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def load_chat_template(value: str | None) -> str | None:
    """`--chat-template` takes a file or the template itself, as in vLLM."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if "{" not in value:  # neither a file nor anything that looks like Jinja: most likely a mistyped path
        raise ValueError(f"--chat-template {value!r} is not a file and does not look like a Jinja template")
    return value


def load_generation_defaults(choice: str, model_defaults: dict) -> dict:
    """`--generation-config`: 'auto' takes the model's generation_config.json, 'vllm'/'none' nothing, or a folder."""
    if choice == "auto":
        return dict(model_defaults)
    if choice in ("vllm", "none"):
        return {}
    path = Path(choice).expanduser() / "generation_config.json"
    if not path.is_file():
        raise ValueError(f"--generation-config {choice!r}: expected 'auto', 'none' or a folder with "
                         "generation_config.json")
    config = json.loads(path.read_text())
    return {key: config[key] for key in GENERATION_DEFAULT_KEYS if key in config}
