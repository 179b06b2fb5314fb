"""The phase rule: prompt tokens (but the last) run in the prefill precision, every emitted token in the decode one."""
from __future__ import annotations

import pytest
import torch

from mixquant import LLM, SamplingParams
from mixquant.config import Phase, phase_of_position
from mixquant.engine.model_runner import ModelRunner
from mixquant.layers.linear import Linear
from mixquant.quantization.linear_methods import BF16Method, FP8Method, NVFP4Method
from mixquant.utils.context import ForwardContext, forward_context

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
BLOCK = 4


def _llm(path, prefill: str, decode: str, **kwargs) -> LLM:
    return LLM(str(path), prefill_precision=prefill, decode_precision=decode, dtype="float32", device="cpu",
               block_size=BLOCK, **kwargs)


def _prompt(llm, blocks: int = 5) -> list[int]:
    """A prompt whose prefill part (all tokens but the last) fills whole KV blocks."""
    ids = llm.get_tokenizer()("The tool returned a long table of records: id 7, id 9, id 12, id 40, " * 3)["input_ids"]
    return ids[:blocks * BLOCK + 1]


def _kv(llm, request_id: str) -> torch.Tensor:
    return llm.engine.export_kv(request_id)["kv"]


def test_phase_of_position():
    assert [phase_of_position(p, 4) for p in range(6)] == [Phase.PREFILL] * 3 + [Phase.DECODE] * 3
    assert phase_of_position(0, 1) is Phase.DECODE


def test_rows_are_split_at_the_last_prompt_token():
    from mixquant.engine.sequence import Sequence

    seq = Sequence("r", 0, list(range(10)), SamplingParams())
    segments = ModelRunner.split_by_phase(seq, 10)
    assert [(s.start, s.end, s.phase) for s in segments] == [(0, 9, Phase.PREFILL), (9, 10, Phase.DECODE)]
    seq.num_computed_tokens = 4
    assert [(s.start, s.end) for s in ModelRunner.split_by_phase(seq, 3)] == [(4, 7)]
    seq.token_ids.append(10)
    seq.num_computed_tokens = 10
    assert [(s.start, s.end, s.phase) for s in ModelRunner.split_by_phase(seq, 1)] == [(10, 11, Phase.DECODE)]


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_phases_that_compute_alike_share_one_segment(tiny_qwen3, precision):
    """A uniform pair runs the last prompt token with the prompt's rows, and computes what the split layout does."""
    assert not _llm(tiny_qwen3, precision, "nvfp4").engine.runner.phases_alike
    llm = _llm(tiny_qwen3, precision, precision, enable_prefix_caching=False)
    runner = llm.engine.runner
    assert runner.phases_alike
    prompt = _prompt(llm)
    layouts = []
    prepare = runner.prepare

    def recording_prepare(batch):
        inputs = prepare(batch)
        layouts.append((inputs.context.num_prefill_rows, inputs.input_ids.shape[0], dict(inputs.rows_per_phase)))
        return inputs

    runner.prepare = recording_prepare
    merged = llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0]
    first_split_step = len(layouts)
    runner.phases_alike = False
    split = llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0]
    by_rule = {Phase.PREFILL: len(prompt) - 1, Phase.DECODE: 1}  # what the counters report, either way
    assert layouts[0] == (len(prompt), len(prompt), by_rule)
    assert layouts[first_split_step] == (len(prompt) - 1, len(prompt), by_rule)
    assert merged.token_ids == split.token_ids
    for ours, theirs in zip(merged.logprobs, split.logprobs):
        for token in ours:
            assert ours[token].logprob == pytest.approx(theirs[token].logprob, abs=1e-5)


def _mixed_layer(precision: str, layer: Linear) -> tuple[Linear, object]:
    """The layer with random weights, its prefill rows in `precision` (emulated) and its decode rows in BF16."""
    layer.weight.data.normal_()
    low = (FP8Method.from_weight(layer.weight, None, native=False) if precision == "fp8" else
           NVFP4Method.from_weight(layer.weight, layer.output_sizes, None, native=False, compute_dtype=torch.float32))
    layer.set_methods(low, BF16Method(layer.weight, None))
    return layer, low


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_linear_routes_rows_by_phase(precision):
    torch.manual_seed(0)
    layer, low = _mixed_layer(precision, Linear(64, [32, 16], bias=False, prefix="model.layers.0.mlp.gate_up_proj",
                                                shard_names=["gate_proj", "up_proj"]))
    x = torch.randn(7, 64)
    with forward_context(ForwardContext(num_prefill_rows=5, slot_mapping=torch.zeros(7, dtype=torch.long))):
        mixed = layer(x)
    torch.testing.assert_close(mixed[:5], low(x[:5]), rtol=0, atol=0)
    torch.testing.assert_close(mixed[5:], x[5:] @ layer.weight.t(), rtol=0, atol=0)
    assert not torch.allclose(low(x[5:]), mixed[5:])  # the two precisions really differ


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_gated_input_is_gated_in_each_phase(precision):
    """Linear(x, activation="silu") computes each phase's rows from silu(gate) * up, as the MLP did before the
    fusion."""
    from mixquant.layers.activation import silu_and_mul

    torch.manual_seed(1)
    layer, low = _mixed_layer(precision, Linear(32, [48], bias=False, prefix="model.layers.0.mlp.down_proj"))
    gate_up = torch.randn(7, 64)
    with forward_context(ForwardContext(num_prefill_rows=5, slot_mapping=torch.zeros(7, dtype=torch.long))):
        gated = layer(gate_up, activation="silu")
        plain = layer(silu_and_mul(gate_up))
    torch.testing.assert_close(gated, plain, rtol=0, atol=0)
    torch.testing.assert_close(gated[:5], low(silu_and_mul(gate_up[:5])), rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_prompt_kv_is_the_low_precision_kv(tiny_qwen3, precision):
    mixed = _llm(tiny_qwen3, precision, "bf16")
    full_low = _llm(tiny_qwen3, precision, precision)
    full_high = _llm(tiny_qwen3, "bf16", "bf16")
    prompt = _prompt(mixed)
    n = len(prompt) - 1  # prefill-phase positions
    kvs = []
    for llm in (mixed, full_low, full_high):
        llm.engine.add_request("r", prompt, SamplingParams(max_tokens=2, ignore_eos=True))
        llm.engine.step()  # the whole prompt in one step: prefill rows + the last prompt token's decode row
        kvs.append(_kv(llm, "r"))
    assert kvs[0].shape[2] * BLOCK == n
    torch.testing.assert_close(kvs[0], kvs[1], rtol=0, atol=0)
    assert (kvs[0] - kvs[2]).abs().max() > 1e-3  # and it is not the high-precision KV


@pytest.mark.parametrize("model", ["tiny_qwen3", "tiny_qwen3_moe"])
@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_emitted_tokens_come_from_decode_precision_over_low_precision_kv(request, model, precision):
    """Mix-Quant's pipeline by hand: a low-precision prefill exports its KV, a BF16 engine decodes over it (so with
    experts, every emitted token ran through BF16 experts)."""
    path = request.getfixturevalue(model)
    mixed = _llm(path, precision, "bf16")
    prompt = _prompt(mixed)
    mixed.engine.add_request("r", prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    mixed.engine.step()  # prefill done, first token emitted, request still live
    exported = mixed.engine.export_kv("r")
    mixed.engine.abort_request("r")
    expected = mixed.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0]

    decoder = _llm(path, "bf16", "bf16")
    decoder.engine.add_request_with_kv("d", prompt, GREEDY, exported)
    outputs = []
    while decoder.engine.has_unfinished_requests():
        outputs += decoder.engine.step()
    got = outputs[-1].outputs[0]
    assert got.token_ids == expected.token_ids
    for ours, theirs in zip(got.logprobs, expected.logprobs):
        assert ours.keys() == theirs.keys()
        for token in ours:
            assert ours[token].logprob == pytest.approx(theirs[token].logprob, abs=1e-5)
    # and a full BF16 run differs: the low-precision prompt KV is really what decode read
    plain = decoder.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0]
    assert plain.logprobs[0][plain.token_ids[0]].logprob != pytest.approx(
        got.logprobs[0][got.token_ids[0]].logprob, abs=1e-6)


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_mixed_step_equals_its_parts(tiny_qwen3, precision):
    """Decode rows of one request and a prefill chunk of another in one forward pass change neither."""
    llm = _llm(tiny_qwen3, precision, "bf16", enable_prefix_caching=False)
    tok = llm.get_tokenizer()
    a = tok("first request about tool outputs and memory")["input_ids"]
    b = tok("a second, longer request that arrives while the first one is decoding its answer")["input_ids"]
    alone = [llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0] for p in (a, b)]

    steps = []
    prepare = llm.engine.runner.prepare

    def recording_prepare(batch):
        inputs = prepare(batch)
        steps.append(dict(inputs.rows_per_phase))
        return inputs

    llm.engine.runner.prepare = recording_prepare
    llm.engine.add_request("a", a, GREEDY)
    llm.engine.step()
    llm.engine.step()
    llm.engine.add_request("b", b, GREEDY)
    finished = {}
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0]
    assert any(s[Phase.PREFILL] > 0 and s[Phase.DECODE] > 1 for s in steps), steps
    for together, apart in zip((finished["a"], finished["b"]), alone):
        assert together.token_ids == apart.token_ids
        for ours, theirs in zip(together.logprobs, apart.logprobs):
            for token in ours:
                assert ours[token].logprob == pytest.approx(theirs[token].logprob, abs=1e-5)


def test_precision_counters_follow_the_phase_rule(tiny_qwen3):
    llm = _llm(tiny_qwen3, "fp8", "bf16")
    prompt = _prompt(llm)
    llm.generate(prompt, SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert llm.engine.stats()["tokens_computed"] == {"prefill/fp8": len(prompt) - 1, "decode/bf16": 5}


def test_unquantized_layers_stay_in_model_dtype(tiny_qwen3):
    llm = _llm(tiny_qwen3, "nvfp4", "bf16", unquantized_layers=["qkv_proj"])
    layers = {l.prefix: l for l in llm.engine.runner.model.linear_layers()}
    assert isinstance(layers["model.layers.0.self_attn.qkv_proj"].prefill_method, BF16Method)
    assert isinstance(layers["model.layers.0.mlp.gate_up_proj"].prefill_method, NVFP4Method)
    full_low = _llm(tiny_qwen3, "nvfp4", "nvfp4")
    assert full_low.engine.runner.model.model.layers[0].mlp.down_proj.weight is None  # no BF16 copy kept


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_teacher_forced_logprobs_equal_generation_logprobs(tiny_qwen3, precision):
    """Scoring a continuation gives the distributions the engine had while generating it (same phase split)."""
    llm = _llm(tiny_qwen3, precision, "bf16", max_num_batched_tokens=7)  # forces several chunks
    prompt = _prompt(llm)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3),
                       use_tqdm=False)[0].outputs[0]
    scores = llm.engine.teacher_forced_logprobs(prompt, out.token_ids)
    assert scores.shape == (len(out.token_ids) + 1, llm.engine.hf_config.vocab_size)
    for row, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert scores[row].argmax().item() == token
        assert scores[row, token].item() == pytest.approx(entry[token].logprob, abs=1e-5)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
