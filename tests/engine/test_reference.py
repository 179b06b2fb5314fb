"""BF16/BF16 (here float32 for exactness) engine against transformers: logits and greedy generations."""
from __future__ import annotations

import pytest
import torch

from mixquant import LLM, SamplingParams

from .helpers import engine_prompt_logits, hf_greedy, hf_model

PROMPTS = ["Hello world, this is a test of the engine", "The capital of France is", "1 2 3 4 5 6 7 8 9 10 11 12",
           "Agents resend long tool outputs every turn, so prefill dominates their cost."]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _llm(path, **kwargs) -> LLM:
    kwargs.setdefault("prefill_precision", "bf16")
    return LLM(str(path), dtype="float32", device="cpu", **kwargs)


@pytest.fixture(scope="module", params=["tiny_qwen3", "tiny_llama", "tiny_qwen2"])
def model_path(request):
    return request.getfixturevalue(request.param)


def test_logits_match_transformers(model_path):
    llm = _llm(model_path)
    ref = hf_model(model_path)
    for prompt in PROMPTS:
        ids = llm.get_tokenizer()(prompt)["input_ids"]
        ours = engine_prompt_logits(llm.engine, ids)
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits[0].float()
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_greedy_matches_transformers_single_and_batched(model_path):
    llm = _llm(model_path)
    ref = hf_model(model_path)
    tok = llm.get_tokenizer()
    expected = [hf_greedy(ref, tok(p)["input_ids"], 12) for p in PROMPTS]
    single = [llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    batched = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert single == expected
    assert batched == expected


def test_prefix_cache_hits_give_the_same_tokens(tiny_qwen3):
    llm = _llm(tiny_qwen3, block_size=4)
    ref = hf_model(tiny_qwen3)
    prompt = "shared system prompt " * 6 + "question one"
    first = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    second = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens > 0
    assert second.outputs[0].token_ids == first.outputs[0].token_ids == hf_greedy(ref, first.prompt_token_ids, 12)
    stats = llm.engine.stats()
    assert stats["prefix_cache_hits"] == second.num_cached_tokens


def test_chunked_prefill_matches(tiny_qwen3):
    llm = _llm(tiny_qwen3, max_num_batched_tokens=5, enable_prefix_caching=False)
    ref = hf_model(tiny_qwen3)
    tok = llm.get_tokenizer()
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(ref, tok(p)["input_ids"], 12) for p in PROMPTS]


def test_preemption_by_recompute_matches(tiny_qwen3):
    # 6 blocks of 4 tokens cannot hold four growing sequences at once: the scheduler must preempt and recompute
    llm = _llm(tiny_qwen3, block_size=4, num_kv_blocks=12, max_model_len=48, enable_prefix_caching=False)
    ref = hf_model(tiny_qwen3)
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(ref, tok(p)["input_ids"], 20) for p in PROMPTS]
    assert llm.engine.block_manager.num_free_blocks == 12


def test_yarn_override_matches_transformers(tmp_path):
    from tests.conftest import save_tiny_model

    path = save_tiny_model(tmp_path / "m", "qwen3", max_position_embeddings=256)
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    llm = _llm(path, hf_overrides={"rope_scaling": rope, "max_position_embeddings": 1024})
    assert llm.engine.max_model_len == 1024
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    config.rope_parameters = {**config.rope_parameters, **rope}
    config.max_position_embeddings = 1024
    ref = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
    ids = list(range(1000, 1600))  # past the original 256 positions
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(engine_prompt_logits(llm.engine, ids), theirs, rtol=1e-4, atol=1e-4)
