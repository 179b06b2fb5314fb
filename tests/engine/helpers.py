"""Test helpers: the engine's full logits for a prompt, and transformers as the reference."""
from __future__ import annotations

import torch

from mixquant.engine.scheduler import ScheduledBatch
from mixquant.engine.sequence import Sequence
from mixquant.sampling_params import SamplingParams


def engine_prompt_logits(engine, token_ids: list[int]) -> torch.Tensor:
    """Logits at every prompt position from one engine forward pass (prefill rows, then the decode row)."""
    seq = Sequence("probe", 0, list(token_ids), SamplingParams(max_tokens=1, prompt_logprobs=0))
    assert engine.block_manager.allocate(seq)
    try:
        inputs = engine.runner.prepare(ScheduledBatch([seq], [len(token_ids)]))
        hidden = engine.runner.forward(inputs)
        return engine.runner.logits(hidden, list(range(len(token_ids))))
    finally:
        engine.block_manager.free_sequence(seq)


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()
