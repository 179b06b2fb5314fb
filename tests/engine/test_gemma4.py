"""Gemma 4 (dense and MoE, saved as the hub's Gemma4ForConditionalGeneration) against transformers in float32, its
sliding-window KV blocks going back to the pool, prefix hits across released blocks, and the phase rule."""
from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixquant import LLM, SamplingParams
from mixquant.cli import main
from mixquant.engine.kv_cache import KVCacheLayout
from mixquant.engine.sequence import Sequence
from mixquant.layers.attention import Attention
from mixquant.layers.linear import Linear
from mixquant.models.gemma4 import Gemma4ForCausalLM
from mixquant.quantization import compressed_tensors as ct
from mixquant.quantization.expert_methods import BF16Experts, FP8Experts, NVFP4Experts
from tests.conftest import TINY_GEMMA4

from .helpers import engine_prompt_logits, hf_greedy, hf_model

WINDOW = TINY_GEMMA4["sliding_window"]
# prompts of 3 to 41 tokens: most longer than the window of 8
PROMPTS = [list(range(1000, 1000 + n)) for n in (3, 17, 30, 41)]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _llm(path, prefill="bf16", decode="bf16", **kwargs) -> LLM:
    return LLM(str(path), prefill_precision=prefill, decode_precision=decode, dtype="float32", device="cpu",
               **kwargs)


def _tokens(llm, prompts, params=GREEDY) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(params=["dense", "moe"])
def gemma4(request, tiny_gemma4, tiny_gemma4_moe):
    return tiny_gemma4 if request.param == "dense" else tiny_gemma4_moe


def test_logits_match_transformers(gemma4):
    llm = _llm(gemma4)
    ref = hf_model(gemma4)
    for prompt in PROMPTS:
        with torch.no_grad():
            theirs = ref(torch.tensor([prompt])).logits[0].float()
        torch.testing.assert_close(engine_prompt_logits(llm.engine, prompt), theirs, rtol=1e-5, atol=1e-5)


def test_greedy_batched_chunked_preempted_and_cached(gemma4):
    ref = hf_model(gemma4)
    expected = [hf_greedy(ref, prompt, GREEDY.max_tokens) for prompt in PROMPTS]
    runs = {
        "batched": _llm(gemma4, block_size=4),
        "chunked": _llm(gemma4, block_size=4, max_num_batched_tokens=5, enable_prefix_caching=False),
        "preempted": _llm(gemma4, block_size=4, num_kv_blocks=24, max_num_batched_tokens=8, max_model_len=56,
                          enable_prefix_caching=False),
    }
    for name, llm in runs.items():
        assert _tokens(llm, PROMPTS) == expected, name
    assert runs["preempted"].engine.scheduler.num_preemptions > 0
    assert runs["preempted"].engine.block_manager.num_free_blocks == 24
    again = runs["batched"].generate(PROMPTS[3], GREEDY, use_tqdm=False)[0]  # the batched run cached its prefix
    assert again.num_cached_tokens == 40 and again.outputs[0].token_ids == expected[3]


def test_layers_follow_the_layer_types(tiny_gemma4):
    """Sliding layers: head_dim 16, 2 KV heads, q/k/v shards, a window; the full layer: head_dim 32, 1 KV head, K
    and V from one projection (no v_proj), no window. Scale 1.0 everywhere."""
    layers = _llm(tiny_gemma4).engine.runner.model.model.layers
    geometry = [(layer.self_attn.attn.head_dim, layer.self_attn.attn.num_kv_heads, layer.self_attn.attn.window,
                 layer.self_attn.qkv_proj.shard_names, layer.self_attn.attn.scale) for layer in layers]
    sliding = (16, 2, WINDOW, ["q_proj", "k_proj", "v_proj"], 1.0)
    assert geometry == [sliding, sliding, (32, 1, None, ["q_proj", "k_proj"], 1.0)]


def test_fp8_prefill_attention_leaves_gemma4_in_the_model_dtype(tiny_gemma4):
    """The FP8 prefill kernels take head_dim 64/128 and no window: 'auto' (as it resolves on a Hopper) falls back to
    the model dtype for Gemma 4, an explicit FP8 choice is refused with the layers that cannot take it."""
    runner = _llm(tiny_gemma4).engine.runner
    runner.config.prefill_attention, runner.config.fp8_attention_min_tokens = "fp8-cudnn", 7168
    runner._check_fp8_prefill_attention()
    assert (runner.config.prefill_attention, runner.config.fp8_attention_min_tokens) == ("bf16", 0)
    runner.config.prefill_attention = runner.config.prefill_attention_requested = "fp8"
    with pytest.raises(ValueError, match=r"prefill_attention='fp8' cannot run: .*\(16, 8\), \(32, None\)"):
        runner._check_fp8_prefill_attention()


def test_prefill_pieces_give_the_eager_tokens(tiny_gemma4_moe):
    """The piecewise prefill path (CUDA graphs on a GPU; here eagerly through its static buffers) with two layer
    geometries in one set of buffers and a layer protocol whose residual is the layer's input; fp8/bf16, so the
    prompts' last tokens run apart, as the decode tail, in every cache group."""
    from tests.engine.test_prefill_graphs import _with_prefill_pieces

    expected = _tokens(_llm(tiny_gemma4_moe, "fp8", "bf16"), PROMPTS)
    pieces = _llm(tiny_gemma4_moe, "fp8", "bf16", block_size=4)
    used = _with_prefill_pieces(pieces, [16, 128])
    assert _tokens(pieces, PROMPTS) == expected and used


def test_text_only_serving_skips_the_towers_and_reads_a_text_checkpoint_alike(tiny_gemma4, tmp_path, caplog):
    """The hub layout loads with the vision tower dropped (and said so); the same weights saved as a gemma4_text
    Gemma4ForCausalLM checkpoint load into the same parameters and match transformers' Gemma4ForCausalLM."""
    with caplog.at_level(logging.INFO, logger="mixquant.models.loader"):
        multimodal = _llm(tiny_gemma4)
    assert isinstance(multimodal.engine.runner.model, Gemma4ForCausalLM)
    assert "skipped" in caplog.text and "model.vision_tower." in caplog.text
    config = json.loads((tiny_gemma4 / "config.json").read_text())
    text_config = {**config["text_config"], "architectures": ["Gemma4ForCausalLM"], "dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(text_config))
    state = hf_model(tiny_gemma4).state_dict()
    text_state = {name.replace("model.language_model.", "model."): t.contiguous() for name, t in state.items()
                  if name.startswith("model.language_model.")}
    save_file(text_state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    for side in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / side).write_bytes((tiny_gemma4 / side).read_bytes())
    text_only = _llm(tmp_path)
    for (name, a), (_, b) in zip(multimodal.engine.runner.model.named_parameters(),
                                 text_only.engine.runner.model.named_parameters()):
        assert torch.equal(a, b), name
    ref = hf_model(tmp_path)
    assert type(ref).__name__ == "Gemma4ForCausalLM"
    with torch.no_grad():
        theirs = ref(torch.tensor([PROMPTS[2]])).logits[0].float()
    torch.testing.assert_close(engine_prompt_logits(text_only.engine, PROMPTS[2]), theirs, rtol=1e-5, atol=1e-5)


def test_block_by_block_kv_transfer_is_refused_before_anything_is_held(tiny_gemma4):
    llm = _llm(tiny_gemma4, block_size=4)
    engine = llm.engine
    engine.add_request("r", PROMPTS[2], GREEDY)
    engine.step()
    with pytest.raises(ValueError, match="one cache group"):
        engine.export_kv("r")
    exported = {"token_ids": PROMPTS[2][:16], "prefill_precision": "bf16", "kv": torch.zeros(1)}
    with pytest.raises(ValueError, match="one cache group"):
        engine.add_request_with_kv("s", PROMPTS[2], GREEDY, exported)
    assert "s" not in engine.requests
    engine.abort_request("r")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_sliding_window_blocks_go_back_to_the_pool(tiny_gemma4):
    """After a 41-token prompt, its sliding layers hold only the blocks its next token can see; the rest are back
    in the pool (and counted), while the full layer keeps every block."""
    llm = _llm(tiny_gemma4, block_size=4, enable_prefix_caching=False)
    engine = llm.engine
    layout, bm = engine.runner.kv_layout, engine.block_manager
    assert layout.window_units == 2  # the two sliding layers' K/V fill a unit each (as the full layer's does)
    engine.add_request("r", PROMPTS[3], GREEDY)
    engine.step()  # the prompt, and the first token
    seq = engine.requests["r"].seqs[0]
    assert seq.num_computed_tokens == 41 and seq.num_tokens == 42
    held = [i for i, units in enumerate(seq.window_table) if units]
    first = (41 - WINDOW + 1) // 4  # the block of the first key position 41 sees
    assert held == list(range(first, 11))
    assert bm.num_blocks - bm.num_free_blocks == len(seq.block_table) + 2 * len(held)  # 11 + 2 * 3, not 11 + 2 * 11
    assert engine.stats()["num_window_blocks_released"] == first
    while engine.has_unfinished_requests():
        engine.step()
    assert bm.num_free_blocks == bm.num_blocks


def test_prefix_hits_need_only_the_window_before_them(tiny_gemma4):
    """Once another request has reused the oldest free units (a finished request's early sliding-window blocks), a
    prompt that extends the finished one still hits its whole cached prefix, which needs the window before its end
    only; the finished prompt itself, whose hit would need early blocks, gets none. What is computed after the hit
    is what transformers computes."""
    ref = hf_model(tiny_gemma4)
    # 52 units: with 54 or more nothing the first request cached is reused, with 48 or fewer all of it
    llm = _llm(tiny_gemma4, block_size=4, num_kv_blocks=52, max_num_batched_tokens=16, max_model_len=128)
    prompt = PROMPTS[2] + PROMPTS[1]  # 47 tokens
    first = llm.generate(prompt, GREEDY, use_tqdm=False)[0]  # computes 54 of its 55 tokens
    llm.generate(list(range(2000, 2030)), GREEDY, use_tqdm=False)
    longer = prompt + first.outputs[0].token_ids + list(range(3000, 3010))

    def cached_tokens(token_ids: list[int]) -> int:  # the hit a new sequence would get (looked up, not allocated)
        bm = llm.engine.block_manager
        return bm._hit_length(*bm._cached_prefix(Sequence("probe", 0, token_ids, GREEDY))) * 4

    assert cached_tokens(prompt) == 0  # would need blocks 9 and 10 of the sliding layers: reused
    assert cached_tokens(longer) == 52  # needs blocks 11 and 12: still cached, as are the full layer's 0 .. 12
    extended = llm.generate(longer, GREEDY, use_tqdm=False)[0]
    assert extended.num_cached_tokens == 52
    assert extended.outputs[0].token_ids == hf_greedy(ref, longer, GREEDY.max_tokens)


@pytest.mark.parametrize("kind,expected", [
    ("31b", dict(window_units=10, padding=0.0, full=80 * 1024, sliding=800 * 1024)),
    ("26b", dict(window_units=13, padding=1 - (5 * 4 + 25 * 8) / (14 * 20), full=20 * 1024, sliding=13 * 20 * 1024)),
])
def test_the_pool_layout_of_the_real_shapes(kind, expected):
    """Gemma 4's two geometries in one pool of equal units, as engine/kv_cache.py lays them out (bf16 bytes per
    token): 31B: a unit is the 10 full layers' block (4 heads of 512), a sliding block 10 units of 5 layers (16
    heads of 256), nothing padded; 26B-A4B: a unit is the 5 full layers' block (2 of 512), which holds 2 sliding
    layers (8 of 256), so the 25 take 13 units."""
    full_layers, sliding_layers, full_kv, sliding_kv = (10, 50, 4, 16) if kind == "31b" else (5, 25, 2, 8)
    layers = ([Attention(32, sliding_kv, 256, 1.0, window=1024) for _ in range(sliding_layers)]
              + [Attention(32, full_kv, 512, 1.0) for _ in range(full_layers)])
    layout = KVCacheLayout(layers, 16, torch.bfloat16)
    assert layout.window_units == expected["window_units"]
    assert layout.padding_fraction() == pytest.approx(expected["padding"])
    assert layout.bytes_per_token() == {"full": expected["full"], "sliding": expected["sliding"]}
    assert {layer.kv_group for layer in layers[-full_layers:]} == {0}
    # one sequence in 100,000 units, prefilled 8,192 tokens a step: all but the sliding layers' units for a chunk
    # and the window before it (ceil((1,023 + 8,192) / 16) + 1 = 577 blocks) hold full-layer blocks
    assert layout.max_tokens(100_000, 8192) == (100_000 - expected["window_units"] * 577) * 16


def _full_layer_keys(llm, seq_id: str, positions: int) -> torch.Tensor:
    """The full-attention layer's cached K of a request's first positions (its blocks are never released)."""
    engine = llm.engine
    seq = engine.requests[seq_id].seqs[0]
    cache = next(t for t in engine.runner.kv_layout.tensors() if t.layer.window is None).key
    pos = torch.arange(positions)
    return cache[torch.tensor(seq.block_table)[pos // 4], pos % 4].clone()


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_prompt_kv_comes_from_the_prefill_precision(tiny_gemma4_moe, precision):
    """The last layer's prompt KV (all of whose inputs came through the layers below: attention, MLP and experts)
    is what the all-low-precision pair writes, and not what BF16 writes."""
    engines = [_llm(tiny_gemma4_moe, p, d, block_size=4) for p, d in ((precision, "bf16"), (precision, precision),
                                                                     ("bf16", "bf16"))]
    experts = engines[0].engine.runner.model.model.layers[0].experts
    assert experts.prefill_method.precision == precision and isinstance(experts.decode_method, BF16Experts)
    routed = engines[0].engine.runner.model.phase_routed_layers()
    assert all(layer.prefill_method.precision == precision and layer.decode_method.precision == "bf16"
               for layer in routed)
    assert sum(isinstance(layer, Linear) for layer in routed) == 3 * 4  # qkv, o, gate/up, down in 3 layers
    prompt = PROMPTS[2]
    keys = []
    for llm in engines:
        llm.engine.add_request("r", prompt, SamplingParams(max_tokens=2, ignore_eos=True))
        llm.engine.step()
        keys.append(_full_layer_keys(llm, "r", len(prompt) - 1))
    torch.testing.assert_close(keys[0], keys[1], rtol=0, atol=0)
    assert (keys[0] - keys[2]).abs().max() > 1e-3


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_emitted_tokens_come_from_bf16_over_low_precision_kv(tiny_gemma4_moe, precision):
    """The mixed pair's answer equals a BF16 engine's whose prompt KV was replaced by the low-precision pair's: so
    every emitted token ran through BF16 layers (and experts), over the prefill precision's KV."""
    prompt, params = PROMPTS[2], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    boundary = len(prompt) - 1  # the prefill part: one step of exactly it, then the rest
    expected = _llm(tiny_gemma4_moe, precision, "bf16", block_size=4, max_num_batched_tokens=boundary).generate(
        prompt, params, use_tqdm=False)[0].outputs[0]
    low = _llm(tiny_gemma4_moe, precision, precision, block_size=4, max_num_batched_tokens=boundary)
    high = _llm(tiny_gemma4_moe, "bf16", "bf16", block_size=4, max_num_batched_tokens=boundary)
    for llm in (low, high):
        llm.engine.add_request("r", prompt, params)
        llm.engine.step()  # positions 0 .. boundary - 1, the same units in both
    high.engine.runner.kv_cache.copy_(low.engine.runner.kv_cache)
    outputs = []
    while high.engine.has_unfinished_requests():
        outputs += high.engine.step()
    got = outputs[-1].outputs[0]
    assert got.token_ids == expected.token_ids
    for ours, theirs in zip(got.logprobs, expected.logprobs):
        for token in ours:
            assert ours[token].logprob == pytest.approx(theirs[token].logprob, abs=1e-5)
    assert low.engine.has_unfinished_requests()  # it never ran the answer: only its prompt KV was used


@pytest.mark.parametrize("scheme", ["fp8", "nvfp4"])
def test_compressed_tensors_prefill_checkpoint(tiny_gemma4_moe, tmp_path, scheme):
    """`mixquant quantize` of the hub layout keeps its names (the language model under model.language_model., the
    vision tower copied) and quantizes the projections (q and k only on the K = V layer), the MLPs and every
    expert, one module each; the router and its scales, the norms, layer_scalar and the tied embeddings stay as
    they were. The engine runs its prefill phase from that checkpoint."""
    out = tmp_path / scheme
    assert main(["quantize", str(tiny_gemma4_moe), str(out), "--scheme", scheme, "--device", "cpu"]) == 0
    original, tensors = load_file(tiny_gemma4_moe / "model.safetensors"), load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["ignore"] == [
        "lm_head", "re:.*router.proj$"]
    projection = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$|\.experts\.(gate_up|down)_proj$")
    kept = [name for name in original if not projection.search(name)]
    assert any("vision_tower" in name for name in kept) and any(name.endswith("router.proj.weight") for name in kept)
    assert all(torch.equal(tensors[name], original[name]) for name in kept)
    layers = "model.language_model.layers"
    modules = {f"{layers}.2.self_attn.k_proj": original[f"{layers}.2.self_attn.k_proj.weight"],
               f"{layers}.0.mlp.down_proj": original[f"{layers}.0.mlp.down_proj.weight"],
               f"{layers}.1.experts.3.up_proj": original[f"{layers}.1.experts.gate_up_proj"][3, 32:],
               f"{layers}.1.experts.3.down_proj": original[f"{layers}.1.experts.down_proj"][3]}
    for module, weight in modules.items():
        restored = ct.decompress_linear(tensors, module, scheme)
        assert (restored - weight).abs().max() / weight.abs().max() < (0.2 if scheme == "nvfp4" else 0.07), module
    assert f"{layers}.2.self_attn.v_proj.weight" not in original and not any(".2.self_attn.v_proj" in n
                                                                             for n in tensors)

    llm = _llm(tiny_gemma4_moe, scheme, "bf16", prefill_model=str(out))
    experts = llm.engine.runner.model.model.layers[1].experts
    assert isinstance(experts.prefill_method, FP8Experts if scheme == "fp8" else NVFP4Experts)
    down = f"{layers}.1.experts.3.down_proj"
    if scheme == "fp8":
        assert torch.equal(experts.prefill_method.q2[3], tensors[f"{down}.weight"])
        at_load = _llm(tiny_gemma4_moe, "fp8", "bf16")  # the same per-channel FP8 of the same weights
        torch.testing.assert_close(engine_prompt_logits(llm.engine, PROMPTS[3]),
                                   engine_prompt_logits(at_load.engine, PROMPTS[3]), rtol=0, atol=0)
    else:
        assert torch.equal(experts.prefill_method.down[3].packed, tensors[f"{down}.weight_packed"])
    assert len(_tokens(llm, PROMPTS[3:])[0]) == GREEDY.max_tokens
