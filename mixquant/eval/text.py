"""Making long prompts fit: a token budget for the model, a character budget for the records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class PromptBudget:
    """At most `max_tokens` prompt tokens, counted with the model's tokenizer; longer prompts lose their middle.

    The middle goes because the instructions open a long-context prompt and the question closes it (LongBench's rule).
    """

    tokenizer: Any  # a transformers tokenizer
    tokenizer_name: str
    max_tokens: int

    def fit(self, text: str) -> str:
        token_ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(token_ids) <= self.max_tokens:
            return text
        head = self.max_tokens // 2
        tail = self.max_tokens - head
        # Decoded apart, the bytes of a character split at one end of the cut cannot merge with those at the other.
        return self.tokenizer.decode(token_ids[:head], skip_special_tokens=True) + self.tokenizer.decode(
            token_ids[-tail:], skip_special_tokens=True
        )

    def options(self) -> dict[str, Any]:
        return {"max_input_tokens": self.max_tokens, "tokenizer": self.tokenizer_name}


def abbreviate_middle(text: str, max_chars: int) -> str:
    """For the records only: what the model saw is recorded in full up to max_chars, the middle elided beyond."""
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters omitted ...]\n{text[-half:]}"
