"""The agentic workload replayed offline. Each turn re-sends the previous prompt, so a dense model's hit is the
previous prompt's whole blocks, and a Qwen3.5 model's the blocks up to the snapshot at the end of the previous
prompt (its last whole block before the last prompt token): exactly that, turn after turn. Without snapshots a
Qwen3.5 model resumes nothing."""
from __future__ import annotations

from mixquant.bench.replay import replay
from mixquant.bench.serve import AgenticWorkload
from mixquant.config import EngineConfig
from mixquant.engine.llm_engine import LLMEngine

BLOCK = 16
WORKLOAD = AgenticWorkload(sessions=1, turns=4, system_tokens=32, first_context_tokens=50, tool_tokens=(16, 40),
                           output_tokens=4, vocab_size=151936)


def _replay(model, **overrides):
    engine = LLMEngine(EngineConfig(model=str(model), dtype="float32", device="cpu", prefill_precision="bf16",
                                    block_size=BLOCK, max_num_batched_tokens=64, **overrides))
    return replay(engine, WORKLOAD), engine


def test_hits_are_the_previous_prompt_up_to_its_snapshot(tiny_qwen3, tiny_qwen3_5):
    previous = [len(WORKLOAD.prompt(0, turn)) for turn in range(WORKLOAD.turns - 1)]
    dense, _ = _replay(tiny_qwen3)
    assert dense.prefix_cache_hits == sum(length // BLOCK * BLOCK for length in previous)
    hybrid, engine = _replay(tiny_qwen3_5)
    assert hybrid.prefix_cache_hits == sum((length - 1) // BLOCK * BLOCK for length in previous)
    assert hybrid.prefix_cache_queries == dense.prefix_cache_queries
    stats = engine.stats()
    assert stats["state_snapshots_resumed"] == WORKLOAD.turns - 1 and stats["state_slots_used"] == 0
    without, _ = _replay(tiny_qwen3_5, num_state_snapshots=0)
    assert without.prefix_cache_hits == 0
