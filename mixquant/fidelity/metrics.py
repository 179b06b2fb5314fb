"""How far a precision pair's next-token distributions and generations stray from the BF16 reference."""
from __future__ import annotations

import math

import torch


def kl_divergence(ref_logprobs: torch.Tensor, other_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) per position, [T, V] log-probabilities in, [T] out (float64; exactly 0 when equal)."""
    ref, other = ref_logprobs.double(), other_logprobs.double()
    terms = ref.exp() * (ref - other)
    return torch.where(ref.isneginf(), 0.0, terms).sum(-1)  # 0 * log 0 counts as 0


def top1_agreement(ref_logprobs: torch.Tensor, other_logprobs: torch.Tensor) -> float:
    return (ref_logprobs.argmax(-1) == other_logprobs.argmax(-1)).double().mean().item()


def first_divergence(ref_tokens: list[int], other_tokens: list[int]) -> int:
    """Index of the first token where two greedy generations differ (the shorter length if one is a prefix)."""
    for i, (a, b) in enumerate(zip(ref_tokens, other_tokens)):
        if a != b:
            return i
    return min(len(ref_tokens), len(other_tokens))


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of an accuracy from n samples (Wilson score; sane at 0 and n)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
