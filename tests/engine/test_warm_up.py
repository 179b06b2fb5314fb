"""The start-up warm-up (run on GPUs) leaves the engine as it found it."""
from __future__ import annotations

from mixquant import LLM, SamplingParams


def test_warm_up_leaves_no_trace(tiny_qwen3):
    llm = LLM(str(tiny_qwen3), device="cpu", max_num_batched_tokens=64, enable_prefix_caching=True)
    engine = llm.engine
    prompts = [[5, 9, 2, 7] * 9, [3, 1, 4, 1, 5, 9, 2, 6]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    before = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    engine._reset_state()

    engine.warm_up()

    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.block_manager.hash_to_block and engine.block_manager.prefix_cache_queries == 0
    assert engine.num_prompt_tokens == engine.num_generation_tokens == 0 and not engine.tokens_computed
    after = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert after == before
    assert engine.num_prompt_tokens == sum(len(p) for p in prompts)


def test_warm_up_runs_a_prefill_beside_a_decode(tiny_qwen3, monkeypatch):
    llm = LLM(str(tiny_qwen3), device="cpu", max_num_batched_tokens=64)
    engine = llm.engine
    mixed = []
    forward = engine.runner.forward

    def recording_forward(inputs):
        # bf16/bf16: a prompt's last token stays with its prompt's rows, so decode rows are running requests'
        mixed.append(0 < inputs.context.num_prefill_rows < inputs.input_ids.shape[0])
        return forward(inputs)

    monkeypatch.setattr(engine.runner, "forward", recording_forward)
    engine.warm_up()
    assert any(mixed)
