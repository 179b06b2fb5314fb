"""Qwen3-MoE against transformers (float32), both checkpoint layouts of its experts, and the phase rule on them."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from mixquant import LLM, SamplingParams
from mixquant.layers.fused_moe import GroupedExperts
from mixquant.quantization.expert_methods import BF16Experts, FP8Experts, NVFP4Experts
from mixquant.utils.context import ForwardContext, forward_context
from tests.conftest import TINY_MOE, save_tiny_model

from .helpers import engine_prompt_logits, hf_greedy, hf_model

PROMPTS = ["Hello world, this is a test of the experts", "The capital of France is",
           "Agents resend long tool outputs every turn, so prefill dominates their cost."]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _prompt(llm) -> list[int]:
    """17 tokens: a prefill part (all but the last) of four whole 4-token blocks."""
    ids = llm.get_tokenizer()(" ".join(PROMPTS))["input_ids"][:17]
    assert len(ids) == 17
    return ids


def _llm(path, prefill="bf16", decode="bf16", **kwargs) -> LLM:
    return LLM(str(path), prefill_precision=prefill, decode_precision=decode, dtype="float32", device="cpu",
               **kwargs)


def _expected(path, llm, max_tokens=10):
    ref = hf_model(path)
    tok = llm.get_tokenizer()
    return [hf_greedy(ref, tok(p)["input_ids"], max_tokens) for p in PROMPTS]


@pytest.fixture(scope="module")
def stacked_layout(tiny_qwen3_moe, tmp_path_factory):
    """The same weights saved as transformers 5 holds them: experts.gate_up_proj [E, 2I, H], experts.down_proj."""
    path = tmp_path_factory.mktemp("stacked-moe")
    for f in tiny_qwen3_moe.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, path / f.name)
    state = {k: v.contiguous() for k, v in hf_model(tiny_qwen3_moe).state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_logits_match_transformers(tmp_path, norm_topk_prob):
    path = save_tiny_model(tmp_path / "m", "qwen3_moe", **{**TINY_MOE, "norm_topk_prob": norm_topk_prob})
    llm = _llm(path)
    experts = llm.engine.runner.model.model.layers[0].mlp.experts
    assert isinstance(experts.prefill_method, BF16Experts)
    assert not hasattr(llm.engine.runner.model.model.layers[1].mlp, "experts")  # mlp_only_layers
    ref = hf_model(path)
    for prompt in PROMPTS:
        ids = llm.get_tokenizer()(prompt)["input_ids"]
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits[0].float()
        torch.testing.assert_close(engine_prompt_logits(llm.engine, ids), theirs, rtol=1e-4, atol=1e-4)


def test_stacked_checkpoint_loads_the_same_weights(tiny_qwen3_moe, stacked_layout):
    per_expert = _llm(tiny_qwen3_moe).engine.runner.model
    stacked = _llm(stacked_layout).engine.runner.model
    for (name, a), (_, b) in zip(per_expert.named_parameters(), stacked.named_parameters()):
        assert torch.equal(a, b), name


def test_greedy_single_batched_chunked_cached_and_preempted(tiny_qwen3_moe):
    expected = _expected(tiny_qwen3_moe, _llm(tiny_qwen3_moe))
    runs = {
        "batched": _llm(tiny_qwen3_moe, block_size=4),
        "chunked": _llm(tiny_qwen3_moe, max_num_batched_tokens=5, enable_prefix_caching=False),
        "preempted": _llm(tiny_qwen3_moe, block_size=4, num_kv_blocks=10, max_model_len=40,
                          enable_prefix_caching=False),
    }
    for name, llm in runs.items():
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected, name
    assert runs["preempted"].engine.scheduler.num_preemptions > 0
    assert runs["preempted"].engine.block_manager.num_free_blocks == 10
    single = runs["batched"]
    again = single.generate(PROMPTS[2], GREEDY, use_tqdm=False)[0]  # the batched run cached its prefix
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == expected[2]


def _experts_layer(seed: int = 0) -> GroupedExperts:
    torch.manual_seed(seed)
    layer = GroupedExperts(num_experts=4, hidden_size=64, intermediate_size=32, prefix="model.layers.0.mlp.experts")
    layer.w13.data.normal_(0, 0.1)
    layer.w2.data.normal_(0, 0.1)
    return layer


def _route(rows: int, experts: int = 4, top_k: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(rows)])
    weights = torch.rand(rows, top_k, generator=g)
    return weights / weights.sum(-1, keepdim=True), ids


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_experts_route_rows_by_phase(precision):
    """Prefill rows through the low-precision experts, decode rows through BF16 ones, in one call."""
    layer = _experts_layer()
    low = (FP8Experts.from_weight(layer.w13, layer.w2, native=False) if precision == "fp8" else
           NVFP4Experts.from_weight(layer.w13, layer.w2, native=False, compute_dtype=torch.float32))
    high = BF16Experts(layer.w13, layer.w2)
    layer.set_methods(low, high)
    x = torch.randn(9, 64)
    weights, ids = _route(9)
    with forward_context(ForwardContext(num_prefill_rows=6, slot_mapping=torch.zeros(9, dtype=torch.long))):
        mixed = layer(x, weights, ids)
    torch.testing.assert_close(mixed[:6], low(x[:6], weights[:6], ids[:6]), rtol=0, atol=0)
    torch.testing.assert_close(mixed[6:], high(x[6:], weights[6:], ids[6:]), rtol=0, atol=0)
    assert not torch.allclose(low(x[6:], weights[6:], ids[6:]), mixed[6:])  # the precisions really differ


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_each_expert_computes_what_a_linear_of_its_precision_does(precision):
    """Expert e's output for a row is down_e(silu(gate_e x) * up_e x) with each projection quantized as a Linear of
    that precision would be; the routed sum weights them."""
    from mixquant.layers.activation import silu_and_mul
    from mixquant.quantization.linear_methods import FP8Method, NVFP4Method

    layer = _experts_layer(1)
    x = torch.randn(5, 64)
    weights, ids = _route(5, seed=1)
    if precision == "fp8":
        method = FP8Experts.from_weight(layer.w13, layer.w2, native=False)
        linear = [(FP8Method.from_weight(layer.w13[e], None, False), FP8Method.from_weight(layer.w2[e], None, False))
                  for e in range(4)]
    else:
        method = NVFP4Experts.from_weight(layer.w13, layer.w2, native=False, compute_dtype=torch.float32)
        linear = [(NVFP4Method.from_weight(layer.w13[e], [32, 32], None, False, torch.float32),
                   NVFP4Method.from_weight(layer.w2[e], [64], None, False, torch.float32)) for e in range(4)]
    expected = torch.zeros_like(x)
    for r in range(5):
        for j in range(2):
            gate_up, down = linear[ids[r, j]]
            expected[r] += weights[r, j] * down(silu_and_mul(gate_up(x[r:r + 1])))[0]
    torch.testing.assert_close(method(x, weights, ids), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_prompt_kv_comes_from_quantized_experts(tiny_qwen3_moe, precision):
    """With attention kept in BF16, layer 1's prompt KV still differs from BF16's: it reads layer 0's experts, which
    ran in the prefill precision; and it equals the KV of the full low-precision pair."""
    keep_attention = ["qkv_proj", "o_proj"]
    engines = [_llm(tiny_qwen3_moe, p, d, block_size=4, unquantized_layers=keep_attention)
               for p, d in ((precision, "bf16"), (precision, precision), ("bf16", "bf16"))]
    experts = engines[0].engine.runner.model.model.layers[0].mlp.experts
    assert experts.prefill_method.precision == precision and isinstance(experts.decode_method, BF16Experts)
    prompt = _prompt(engines[0])
    kvs = []
    for llm in engines:
        llm.engine.add_request("r", prompt, SamplingParams(max_tokens=2, ignore_eos=True))
        llm.engine.step()
        kvs.append(llm.engine.export_kv("r")["kv"])
    layer0, layer1 = (slice(None), 0), (slice(None), 1)
    torch.testing.assert_close(kvs[0][layer0], kvs[2][layer0], rtol=0, atol=0)  # attention alone: BF16
    torch.testing.assert_close(kvs[0], kvs[1], rtol=0, atol=0)
    assert (kvs[0][layer1] - kvs[2][layer1]).abs().max() > 1e-3
