"""Turns next-token logits into tokens: grammar masks, penalties, min_tokens, temperature, top-k, top-p, min-p,
seeded sampling.

Logprobs are those of the model's own distribution (vLLM's default "raw" logprobs), before any processing but the
grammar's token mask (applied first, as vLLM applies its bitmask before its sampler).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mixquant.engine.sequence import Sequence


@dataclass
class TokenBitmask:
    """Allowed tokens of some rows of a batch: bit j of bits[row, j // 32] (int32) allows token j in that row."""
    rows: list[int]  # the rows the bitmask holds (the others' bits are left as they were)
    bits: torch.Tensor  # [>= batch, ceil(vocab / 32)] on the host


def apply_token_bitmask(logits: torch.Tensor, bitmask: TokenBitmask):
    """Sets every token the bitmask disallows to -inf, in place, in the bitmask's rows only (xgrammar's kernel: a
    Triton one on a GPU)."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask.bits.to(logits.device, non_blocking=True),
                                    vocab_size=logits.shape[-1], indices=bitmask.rows)


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float]  # of the chosen token
    ranks: list[int]
    top_ids: list[list[int]]  # per row, the top-k requested by that row
    top_logprobs: list[list[float]]


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence], stop_ids: list[set[int]]):
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.min_tokens and seq.num_output_tokens < p.min_tokens and stop_ids[row]:
            logits[row, list(stop_ids[row])] = float("-inf")
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
            values = logits[row, seen]
            logits[row, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            out = seq.output_token_ids
            if out:
                ids, counts = torch.tensor(out, device=logits.device).unique(return_counts=True)
                logits[row, ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty


def _filter(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Zeroes what top-k, top-p and min-p exclude, row by row; the most likely token always stays."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    top_k = torch.tensor([s.params.top_k or probs.shape[-1] for s in seqs], device=probs.device)[:, None]
    top_p = torch.tensor([s.params.top_p for s in seqs], device=probs.device, dtype=probs.dtype)[:, None]
    min_p = torch.tensor([s.params.min_p for s in seqs], device=probs.device, dtype=probs.dtype)[:, None]
    drop = ranks >= top_k
    drop |= (sorted_probs.cumsum(-1) - sorted_probs) > top_p
    drop |= sorted_probs < min_p * sorted_probs[:, :1]
    drop[:, 0] = False
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def sample(logits: torch.Tensor, seqs: list[Sequence], stop_ids: list[set[int]],
           default_generator: torch.Generator, bitmask: TokenBitmask | None = None) -> SampleOutput:
    logits = logits.float()
    if bitmask is not None:
        apply_token_bitmask(logits, bitmask)
    want_logprobs = any(s.params.logprobs is not None for s in seqs)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    logits = logits.clone()
    apply_penalties(logits, seqs, stop_ids)

    greedy = torch.tensor([s.params.greedy for s in seqs], device=logits.device)
    chosen = logits.argmax(dim=-1)
    if not bool(greedy.all()):
        temps = torch.tensor([s.params.temperature or 1.0 for s in seqs], device=logits.device)[:, None]
        probs = torch.softmax(logits / temps, dim=-1)
        if any(s.params.top_k or s.params.top_p < 1 or s.params.min_p > 0 for s in seqs):
            probs = _filter(probs, seqs)
        # exponential race: argmax(p / E) with E ~ Exp(1) draws from p; each seeded sequence draws its own noise
        noise = torch.empty_like(probs).exponential_(generator=default_generator)
        for row, seq in enumerate(seqs):
            if seq.generator is not None:
                noise[row].exponential_(generator=seq.generator)
        sampled = (probs / noise).argmax(dim=-1)
        chosen = torch.where(greedy, chosen, sampled)

    token_ids = chosen.tolist()
    out = SampleOutput(token_ids, [0.0] * len(seqs), [0] * len(seqs), [[] for _ in seqs], [[] for _ in seqs])
    if raw_logprobs is not None:
        chosen_lp = raw_logprobs.gather(1, chosen[:, None])
        ranks = (raw_logprobs > chosen_lp).sum(-1) + 1
        out.logprobs, out.ranks = chosen_lp.squeeze(1).tolist(), ranks.tolist()
        k = max(s.params.logprobs or 0 for s in seqs)
        if k:
            top_lp, top_ids = raw_logprobs.topk(k, dim=-1)
            for row, seq in enumerate(seqs):
                n = seq.params.logprobs or 0
                out.top_ids[row], out.top_logprobs[row] = top_ids[row, :n].tolist(), top_lp[row, :n].tolist()
    return out
