"""How far a precision pair's next-token distributions and generations stray from the BF16 reference.

Pure functions on tensors and lists, so each can be checked on cases small enough to compute by hand.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def kl_divergence(ref_logprobs: torch.Tensor, other_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) per position: [T, V] log-probabilities in, [T] out.

    Accumulated in float64 so that a mean over many small per-token values is not swamped by rounding; identical
    inputs give exactly 0 (each term is p * (a - a)).
    """
    if ref_logprobs.shape != other_logprobs.shape:
        raise ValueError(f"shapes differ: {tuple(ref_logprobs.shape)} and {tuple(other_logprobs.shape)}")
    ref, other = ref_logprobs.double(), other_logprobs.double()
    terms = ref.exp() * (ref - other)
    return torch.where(ref.isneginf(), 0.0, terms).sum(-1)  # 0 * log 0 counts as 0 (and -inf - -inf is nan)


def top1_agreement(ref_logprobs: torch.Tensor, other_logprobs: torch.Tensor) -> float:
    """Fraction of positions whose most likely next token is the same in both: [T, V] each."""
    return (ref_logprobs.argmax(-1) == other_logprobs.argmax(-1)).double().mean().item()


def first_divergence(ref_tokens: Sequence[int], other_tokens: Sequence[int]) -> int:
    """Index of the first token where two greedy generations differ (the shorter length if one is a prefix)."""
    for i, (a, b) in enumerate(zip(ref_tokens, other_tokens)):
        if a != b:
            return i
    return min(len(ref_tokens), len(other_tokens))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linearly interpolated between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of an accuracy from n samples (Wilson score: stays inside [0, 1], sane at 0 and n)."""
    if not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n, got {correct} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
