"""Qwen3.5 (Gated DeltaNet + gated attention) against transformers in float32, its per-sequence state (slots,
snapshots, prefix hits), and the phase rule on its projections and state."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mixquant import LLM, SamplingParams
from mixquant.layers.gated_delta_net import GatedDeltaNet
from mixquant.quantization.linear_methods import BF16Method, FP8Method

from .helpers import engine_prompt_logits, hf_greedy, hf_model

PROMPTS = ["Hello world, this is a test of the delta rule", "The capital of France is",
           "Agents resend long tool outputs every turn, so prefill dominates their cost."]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
ARCHS = ["tiny_qwen3_5", "tiny_qwen3_5_moe"]


def _llm(path, prefill="bf16", decode="bf16", **kwargs) -> LLM:
    return LLM(str(path), prefill_precision=prefill, decode_precision=decode, dtype="float32", device="cpu",
               **kwargs)


def _ids(llm, text: str) -> list[int]:
    return llm.get_tokenizer()(text)["input_ids"]


@pytest.fixture(scope="module", params=ARCHS)
def model_and_expected(request):
    """A tiny Qwen3.5 and transformers' greedy tokens for PROMPTS."""
    path = request.getfixturevalue(request.param)
    llm = _llm(path)
    ref = hf_model(path)
    return path, [hf_greedy(ref, _ids(llm, p), GREEDY.max_tokens) for p in PROMPTS]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch, request):
    path = request.getfixturevalue(arch)
    llm = _llm(path)
    model = llm.engine.runner.model
    layers = model.model.layers
    assert [layer.layer_type for layer in layers] == hf_model(path).config.layer_types
    gdn = layers[0].linear_attn
    assert isinstance(gdn, GatedDeltaNet) and isinstance(gdn.in_proj_b, nn.Linear)  # beta/decay inputs: model dtype
    assert not any("visual" in name for name, _ in model.named_parameters())
    ref = hf_model(path)
    for prompt in PROMPTS:
        ids = _ids(llm, prompt)
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits[0].float()
        torch.testing.assert_close(engine_prompt_logits(llm.engine, ids), theirs, rtol=1e-4, atol=1e-4)


def test_greedy_batched_chunked_cached_and_preempted(model_and_expected):
    path, expected = model_and_expected
    runs = {
        "batched": _llm(path, block_size=4),
        "chunked": _llm(path, max_num_batched_tokens=5, enable_prefix_caching=False),
        "preempted": _llm(path, block_size=4, num_kv_blocks=10, max_model_len=40),
    }
    for name, llm in runs.items():
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected, name
    preempted = runs["preempted"].engine
    assert preempted.scheduler.num_preemptions > 0
    assert preempted.block_manager.num_free_blocks == 10 and preempted.stats()["state_slots_used"] == 0
    batched = runs["batched"]
    again = batched.generate(PROMPTS[2], GREEDY, use_tqdm=False)[0]  # the batched run saved this prompt's state
    prompt_end = (len(_ids(batched, PROMPTS[2])) - 1) // 4 * 4
    assert again.num_cached_tokens == prompt_end and again.outputs[0].token_ids == expected[2]
    assert batched.engine.stats()["state_snapshots_resumed"] == 1


def test_prefix_hits_resume_only_where_a_snapshot_was_saved(tiny_qwen3_5):
    """Block size 4. A 23-token prompt saves its state at 20 (its last whole block before its last token). A prompt
    sharing its first 14 tokens matches 3 cached blocks but resumes at 0, saving its state at 12 (where the shared
    part ends) for the next such prompt, which resumes there; the next turn of the first conversation resumes at 20.
    With snapshots every 8 tokens too, the sharing prompt resumes at 8 at once; with none, nothing resumes. Every
    output is transformers' greedy."""
    ref = hf_model(tiny_qwen3_5)
    first = list(range(1000, 1023))
    branch, other_branch = first[:14] + list(range(3000, 3006)), first[:14] + list(range(4000, 4009))
    next_turn = first + list(range(5000, 5010))

    def run(engine_llm, ids):
        out = engine_llm.generate(ids, GREEDY, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == hf_greedy(ref, ids, GREEDY.max_tokens)
        return out.num_cached_tokens

    llm = _llm(tiny_qwen3_5, block_size=4)
    assert run(llm, first) == 0 and llm.engine.stats()["state_snapshots"] == 1
    assert run(llm, branch) == 0
    assert run(llm, other_branch) == 12
    assert run(llm, next_turn) == 20
    grid = _llm(tiny_qwen3_5, block_size=4, state_snapshot_interval=8)
    assert run(grid, first) == 0 and grid.engine.stats()["state_snapshots"] == 3  # at 8, 16 and 20
    assert run(grid, branch) == 8
    no_snapshots = _llm(tiny_qwen3_5, block_size=4, num_state_snapshots=0)
    assert run(no_snapshots, first) == 0 and run(no_snapshots, next_turn) == 0
    assert no_snapshots.engine.block_manager.hash_to_block  # the KV blocks were cached all along


def test_snapshots_stay_within_their_rows_and_go_with_their_blocks(tiny_qwen3_5):
    llm = _llm(tiny_qwen3_5, block_size=4, num_state_snapshots=2, num_kv_blocks=24, max_model_len=96)
    prompts = [list(range(start, start + 13)) for start in (2000, 4000, 6000)]
    for prompt in prompts:
        llm.generate(prompt, GREEDY, use_tqdm=False)
    slots = llm.engine.block_manager.state_slots
    assert slots.num_saved == 3 and len(slots.snapshots) == 2  # the oldest made room
    assert llm.generate(prompts[0], GREEDY, use_tqdm=False)[0].num_cached_tokens == 0
    assert llm.generate(prompts[2], GREEDY, use_tqdm=False)[0].num_cached_tokens == 12
    # a snapshot whose block is evicted goes with it: fill the cache with new prompts
    for start in range(8000, 8100, 20):
        llm.generate(list(range(start, start + 13)), GREEDY, use_tqdm=False)
    bm = llm.engine.block_manager
    assert all(any(bm.blocks[b].hash == h for b in bm.hash_to_block.values()) for h in slots.snapshots)
    assert len(slots.free_rows) + len(slots.snapshots) == 2


def test_state_slots_return_after_abort_and_preemption(tiny_qwen3_5):
    llm = _llm(tiny_qwen3_5, block_size=4, num_kv_blocks=14, max_num_seqs=4, max_model_len=56)
    engine = llm.engine
    assert engine.block_manager.state_slots.num_free_slots == 4
    for i in range(4):
        engine.add_request(str(i), list(range(100 * i + 1000, 100 * i + 1011)),
                           SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()
    assert engine.stats()["state_slots_used"] == 4
    while engine.scheduler.num_preemptions == 0 and engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.num_preemptions > 0
    assert engine.stats()["state_slots_used"] == len(engine.scheduler.running) < 4  # the preempted gave theirs
    engine.abort_request("0")
    engine.abort_request("1")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats()["state_slots_used"] == 0 and engine.block_manager.state_slots.num_free_slots == 4
    assert engine.block_manager.num_free_blocks == 14
    with pytest.raises(ValueError, match="recurrent state"):
        engine.export_kv("0")


def _state_after_prompt(path, prefill: str, decode: str, prompt: list[int]):
    """The engine after a first step that computed all prompt tokens but the last (prefill rows only)."""
    llm = _llm(path, prefill, decode, block_size=4, enable_prefix_caching=False,
               max_num_batched_tokens=len(prompt) - 1)
    llm.engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3))
    llm.engine.step()
    assert llm.engine.requests["r"].seqs[0].num_computed_tokens == len(prompt) - 1
    return llm


def _states(llm) -> dict[str, torch.Tensor]:
    slot = llm.engine.requests["r"].seqs[0].state_slot
    pool = llm.engine.runner.state_pool
    return {name: tensor[:, slot].clone() for name, tensor in pool.tensors.items()} | {
        "kv": llm.engine.runner.kv_cache.clone()}


def test_prompt_state_comes_from_the_prefill_precision(tiny_qwen3_5):
    """Conv state, recurrent state and KV after the prompt rows equal the full low-precision pair's and differ from
    BF16's: the GDN projections ran in the prefill precision for prompt rows."""
    precision, prompt = "fp8", list(range(1500, 1517))
    mixed = _state_after_prompt(tiny_qwen3_5, precision, "bf16", prompt)
    gdn = mixed.engine.runner.model.model.layers[0].linear_attn
    assert gdn.in_proj_qkvz.prefill_method.precision == precision and gdn.out_proj.prefill_method.precision == precision
    assert isinstance(gdn.in_proj_qkvz.decode_method, BF16Method)
    low = _states(_state_after_prompt(tiny_qwen3_5, precision, precision, prompt))
    high = _states(_state_after_prompt(tiny_qwen3_5, "bf16", "bf16", prompt))
    for name, state in _states(mixed).items():
        torch.testing.assert_close(state, low[name], rtol=0, atol=0)
        assert (state - high[name]).abs().max() > 1e-4, name


def test_emitted_tokens_come_from_bf16_layers(tiny_qwen3_5):
    """An FP8 prefill's KV and state, decoded by a BF16-only engine, give the mixed engine's tokens and logprobs: so
    the mixed engine ran every decode row (the last prompt token's included) in BF16."""
    prompt = list(range(1500, 1517))
    mixed = _state_after_prompt(tiny_qwen3_5, "fp8", "bf16", prompt)
    decoder = _state_after_prompt(tiny_qwen3_5, "bf16", "bf16", prompt)
    assert decoder.engine.requests["r"].seqs[0].state_slot == mixed.engine.requests["r"].seqs[0].state_slot
    decoder.engine.runner.kv_cache.copy_(mixed.engine.runner.kv_cache)
    for name, tensor in decoder.engine.runner.state_pool.tensors.items():
        tensor.copy_(mixed.engine.runner.state_pool.tensors[name])

    def finish(llm):
        outputs = []
        while llm.engine.has_unfinished_requests():
            outputs += llm.engine.step()
        return outputs[-1].outputs[0]

    expected, got = finish(mixed), finish(decoder)
    assert got.token_ids == expected.token_ids
    for ours, theirs in zip(got.logprobs, expected.logprobs):
        for token in ours:
            assert ours[token].logprob == pytest.approx(theirs[token].logprob, abs=1e-5)


def test_prefill_checkpoint_leaving_linear_attention_in_bf16(tiny_qwen3_5, tmp_path):
    """llm-compressor's Qwen3.5 recipe ignores re:.*linear_attn.*: such a prefill checkpoint loads, its GDN
    projections run BF16 in both phases, and it computes what quantizing at load with those layers kept does."""
    from mixquant.cli import main

    ignore = "re:.*linear_attn.*"
    out = tmp_path / "fp8"
    assert main(["quantize", str(tiny_qwen3_5), str(out), "--scheme", "fp8", "--device", "cpu",
                 "--ignore", ignore]) == 0
    from_checkpoint = LLM(str(tiny_qwen3_5), prefill_model=str(out), dtype="float32", device="cpu")
    layers = from_checkpoint.engine.runner.model.model.layers
    assert isinstance(layers[0].linear_attn.in_proj_qkvz.prefill_method, BF16Method)
    assert isinstance(layers[0].mlp.down_proj.prefill_method, FP8Method)
    assert isinstance(layers[2].self_attn.qkv_proj.prefill_method, FP8Method)
    at_load = _llm(tiny_qwen3_5, "fp8", unquantized_layers=[ignore])
    ids = list(range(2000, 2030))
    torch.testing.assert_close(engine_prompt_logits(from_checkpoint.engine, ids),
                               engine_prompt_logits(at_load.engine, ids), rtol=0, atol=0)


def test_snapshot_settings_are_checked(tiny_qwen3_5, capsys):
    from mixquant.cli import main
    from mixquant.config import EngineConfig

    with pytest.raises(ValueError, match="num_state_snapshots must be >= 0"):
        EngineConfig(model=str(tiny_qwen3_5), device="cpu", num_state_snapshots=-1)
    assert main(["serve", str(tiny_qwen3_5), "--device", "cpu", "--state-snapshot-interval", "100"]) == 2
    assert "state_snapshot_interval must be a non-negative multiple of block_size (16), got 100" in \
        capsys.readouterr().err
