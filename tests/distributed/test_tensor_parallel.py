"""Tensor parallelism on the CPU (gloo, 2 ranks) against one device: the same greedy tokens, logits within 1e-5 (the
row-parallel sums add in another order), the same KV, and each rank holding exactly its part of every weight.

One 2-rank engine per model and precision pair, built once per module (a worker costs an interpreter and a load):
the dense model splits its KV heads (2 heads, 2 ranks); the MoE model has one KV head, which both ranks hold, and a
head tied to its embedding; a Llama with attention biases (QKV's split with their rows, o_proj's added once, after
the all-reduce) runs from an FP8 checkpoint.
"""
from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mixquant import LLM, SamplingParams
from mixquant.cli import main
from tests.conftest import TINY_MOE, save_tiny_model
from tests.engine.helpers import engine_prompt_logits

PROMPTS = ["Hello world, this is a test of tensor parallelism on two ranks",
           "The capital of France is", "Agents resend long tool outputs every turn, so prefill dominates their cost."]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
# chunked prefill (8 tokens a step), preemption (14 blocks of 4 tokens for three ~25-token sequences), prefix caching
ENGINE = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=14, max_model_len=56,
              max_num_batched_tokens=8, enable_prefix_caching=True)
# (model, prefill precision, compressed-tensors prefill_model of that scheme or quantized at load)
VARIANTS = {"dense-bf16": ("dense", "bf16", False), "dense-fp8": ("dense", "fp8", False),
            "dense-nvfp4": ("dense", "nvfp4", False), "llama-biases-fp8-checkpoint": ("llama", "fp8", True),
            "moe-bf16": ("moe", "bf16", False), "moe-fp8": ("moe", "fp8", False), "moe-nvfp4": ("moe", "nvfp4", False),
            "moe-nvfp4-checkpoint": ("moe", "nvfp4", True)}


@dataclass
class Engines:
    one: LLM  # tensor_parallel_size 1
    two: LLM  # tensor_parallel_size 2
    model: str
    precision: str


@pytest.fixture(scope="module")
def tiny_moe_one_kv_head(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-moe-mqa"), "qwen3_moe", num_key_value_heads=1,
                           tie_word_embeddings=True, **TINY_MOE)


@pytest.fixture(scope="module")
def tiny_llama_biases(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-biases"), "llama", attention_bias=True)


@pytest.fixture(scope="module", params=list(VARIANTS))
def engines(request, tiny_qwen3, tiny_moe_one_kv_head, tiny_llama_biases, tmp_path_factory):
    model, precision, from_checkpoint = VARIANTS[request.param]
    path = {"dense": tiny_qwen3, "moe": tiny_moe_one_kv_head, "llama": tiny_llama_biases}[model]
    kwargs = dict(ENGINE, prefill_precision=precision, decode_precision="bf16")
    if from_checkpoint:
        checkpoint = tmp_path_factory.mktemp(f"{model}-{precision}")
        assert main(["quantize", str(path), str(checkpoint), "--scheme", precision, "--device", "cpu"]) == 0
        kwargs["prefill_model"] = str(checkpoint)
    one = LLM(str(path), **kwargs)  # first: no engine may be built while a tensor-parallel one runs
    two = LLM(str(path), tensor_parallel_size=2, **kwargs)
    yield Engines(one, two, model, precision)
    worker = two.engine.runner.workers[0]
    two.engine.close()
    assert not worker.is_alive() and not multiprocessing.active_children()


def test_greedy_tokens_equal_one_device_through_chunks_preemption_and_prefix_hits(engines):
    runs = []
    for llm in (engines.one, engines.two):
        first = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        again = llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0]  # its prefix is cached now
        runs.append(([o.outputs[0].token_ids for o in first], again.outputs[0].token_ids, again.num_cached_tokens))
    assert runs[1] == runs[0]
    engine = engines.two.engine
    assert engine.scheduler.num_preemptions > 0 and runs[1][2] > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks == 14


def test_logits_equal_one_device_within_1e_5(engines):
    ids = engines.one.get_tokenizer()(" ".join(PROMPTS))["input_ids"][:21]
    logits = [engine_prompt_logits(llm.engine, ids) for llm in (engines.one, engines.two)]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    scores = [llm.engine.teacher_forced_logprobs(ids[:12], ids[12:]) for llm in (engines.one, engines.two)]
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-5, atol=1e-5)
    # prompt logprobs and sampled logprobs: several logits calls on one step's hidden states
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2, logprobs=2)
    outs = [llm.generate(ids, params, use_tqdm=False)[0] for llm in (engines.one, engines.two)]
    entries = [[lp for pos in o.prompt_logprobs[1:] + o.outputs[0].logprobs for lp in pos.items()] for o in outs]
    assert [token for token, _ in entries[1]] == [token for token, _ in entries[0]]
    assert [lp.logprob for _, lp in entries[1]] == pytest.approx([lp.logprob for _, lp in entries[0]], abs=1e-5)


def test_kv_export_assembles_every_head_and_import_gives_each_rank_its_heads(engines):
    prompt = engines.one.get_tokenizer()(PROMPTS[2])["input_ids"][:17]
    exported = []
    for llm in (engines.one, engines.two):
        llm.engine.add_request("kv", prompt, SamplingParams(max_tokens=2, ignore_eos=True))
        while llm.engine.requests["kv"].seqs[0].num_output_tokens == 0:
            llm.engine.step()
        exported.append(llm.engine.export_kv("kv"))
        llm.engine.abort_request("kv")
    torch.testing.assert_close(exported[1]["kv"], exported[0]["kv"], rtol=1e-5, atol=1e-5)
    expected = engines.one.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    engine = engines.two.engine
    engine.add_request_with_kv("imported", prompt, GREEDY, exported[0])
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].outputs[0].token_ids == expected


def _rank0_part(tensor: torch.Tensor, split: str, sizes: list[int], whole: list[bool]) -> torch.Tensor:
    """Rank 0's part of a one-device tensor: "rows" the first half of each fused shard's rows (all of a replicated
    shard's), "columns" the first half of the columns, "none" all of it (a per-row or per-tensor scale)."""
    if split == "columns":
        return tensor[..., :tensor.shape[-1] // 2]
    if split == "none":
        return tensor
    return torch.cat([s if w else s[:s.shape[0] // 2] for s, w in zip(tensor.split(sizes), whole)])


def _method_parts(engines) -> list[tuple[str, object, object, str, list[int], list[bool]]]:
    """(name, one device's method, rank 0's method, how its input dim is split, fused shard sizes, replicated)."""
    one, two = engines.one.engine.model_runner.model.model.layers, engines.two.engine.model_runner.model.model.layers
    kv = 16 if engines.model == "moe" else 32  # one KV head of 16 (held by both ranks) or two (one each)
    parts = [("qkv_proj", one[1].self_attn.qkv_proj.prefill_method, two[1].self_attn.qkv_proj.prefill_method,
              "rows", [64, kv, kv], [False, kv == 16, kv == 16]),
             ("o_proj", one[1].self_attn.o_proj.prefill_method, two[1].self_attn.o_proj.prefill_method, "columns",
              [64], [False]),
             ("gate_up_proj", one[1].mlp.gate_up_proj.prefill_method, two[1].mlp.gate_up_proj.prefill_method, "rows",
              [128, 128], [False, False]),
             ("down_proj", one[1].mlp.down_proj.prefill_method, two[1].mlp.down_proj.prefill_method, "columns",
              [64], [False])]
    if engines.model == "moe":
        experts_one, experts_two = one[0].mlp.experts.prefill_method, two[0].mlp.experts.prefill_method
        for e in range(TINY_MOE["num_experts"]):
            parts += [(f"experts.{e}.gate_up", experts_one.gate_up[e], experts_two.gate_up[e], "rows", [32, 32],
                       [False, False]),
                      (f"experts.{e}.down", experts_one.down[e], experts_two.down[e], "columns", [64], [False])]
    return parts


def test_rank0_holds_exactly_its_part_of_every_weight_in_every_precision(engines):
    """QKV, gate/up and each expert's gate/up by rows (the dense model's two KV heads split, the MoE model's one
    held whole), o_proj, down_proj and each expert's down by input columns. FP8's per-channel scales follow their
    rows, and are whole-row scales in a row-parallel layer; NVFP4 keeps whole blocks and each shard's global scale:
    bit for bit one device's."""
    tensors = {"bf16": {"weight": True}, "fp8": {"qweight": True, "weight_scale": False},
               "nvfp4": {"packed": True, "block_scale": True, "weight_global_scale": False}}[engines.precision]
    for name, ours, theirs, split, sizes, whole in _method_parts(engines):
        for tensor, has_input_dim in tensors.items():
            how = split if split == "rows" or has_input_dim else "none"
            expected = _rank0_part(getattr(ours, tensor), how, sizes, whole)
            assert torch.equal(getattr(theirs, tensor).view(torch.uint8), expected.view(torch.uint8)), (name, tensor)
    one, two = engines.one.engine.model_runner.model, engines.two.engine.model_runner.model
    if engines.model == "llama":
        ours, theirs = one.model.layers[1].self_attn, two.model.layers[1].self_attn
        assert torch.equal(theirs.qkv_proj.bias, _rank0_part(ours.qkv_proj.bias, "rows", [64, 32, 32], [False] * 3))
        assert torch.equal(theirs.o_proj.bias, ours.o_proj.bias) and theirs.o_proj.prefill_method.bias is None
    vocab = one.config.vocab_size
    assert two.lm_head.weight.shape[0] == vocab // 2
    assert torch.equal(two.lm_head.weight, one.lm_head.weight[:vocab // 2])
    assert (two.lm_head.weight is two.model.embed_tokens.weight) == (engines.model == "moe")  # tied: one slice
