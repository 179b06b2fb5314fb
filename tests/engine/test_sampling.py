"""Sampling parameters: validation, seeds, filters, stops, penalties, n, logprobs."""
from __future__ import annotations

import pytest
import torch

from mixquant import LLM, SamplingParams
from mixquant.engine.sequence import Sequence
from mixquant.layers.sampler import apply_penalties, sample


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(str(tiny_qwen3), dtype="float32", device="cpu", prefill_precision="bf16")


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5), ("max_tokens", 0),
    ("n", 0), ("logprobs", -1), ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("stop", [""]),
    ("stop_token_ids", [-1]), ("min_tokens", -1),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_refused():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=3)


def _texts(llm, prompt, params):
    return [(c.token_ids, c.text) for c in llm.generate(prompt, params, use_tqdm=False)[0].outputs]


def test_seed_reproduces_and_differs(llm):
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=7, ignore_eos=True)
    a, b = _texts(llm, "Once upon a time", params), _texts(llm, "Once upon a time", params)
    c = _texts(llm, "Once upon a time", SamplingParams(temperature=1.0, max_tokens=10, seed=8, ignore_eos=True))
    assert a == b and a != c


def test_seeded_request_unaffected_by_batch_neighbours(llm):
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=3, ignore_eos=True)
    alone = _texts(llm, "Once upon a time", params)
    together = llm.generate(["Once upon a time", "Other prompt here"],
                            [params, SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)], use_tqdm=False)
    assert [(c.token_ids, c.text) for c in together[0].outputs] == alone


def test_top_k_one_is_greedy(llm):
    greedy = _texts(llm, "The answer is", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    top1 = _texts(llm, "The answer is", SamplingParams(temperature=1.5, top_k=1, max_tokens=8, ignore_eos=True))
    assert greedy == top1


def test_n_returns_n_distinct_samples(llm):
    out = llm.generate("Once upon a time", SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=1,
                                                          ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    assert all(len(c.token_ids) == 6 and c.finish_reason == "length" for c in out.outputs)


def test_prompt_tokens_count_once_per_request(llm):
    before = llm.engine.stats()["prompt_tokens"]
    out = llm.generate("Count me once", SamplingParams(n=3, max_tokens=2, temperature=1.0, seed=0),
                       use_tqdm=False)[0]
    assert llm.engine.stats()["prompt_tokens"] - before == len(out.prompt_token_ids)


def test_stop_string_truncates_and_can_be_kept(llm):
    full = _texts(llm, "Hello", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0][1]
    stop = full[3:6]
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=12, stop=stop, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == full[:full.index(stop)] and out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=12, stop=stop, ignore_eos=True,
                                                include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == full[:full.index(stop) + len(stop)]


def test_stop_token_ids_and_min_tokens(llm):
    tokens = _texts(llm, "Hello", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0][0]
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[tokens[2]]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == tokens[:3] and out.stop_reason == tokens[2]
    assert out.text == llm.get_tokenizer().decode(tokens[:2])  # the stopping token's text is left out
    held = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=10, min_tokens=6,
                                                stop_token_ids=[tokens[2]]), use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) >= 6 and tokens[2] not in held.token_ids[:6]


def test_logprobs_are_the_models_distribution(llm):
    out = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 4
    for token, entry in zip(out.token_ids, out.logprobs):
        assert list(entry)[0] == token and entry[token].rank == 1  # greedy picks the top token
        assert len(entry) == 3
        values = [lp.logprob for lp in entry.values()]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_prompt_logprobs(llm):
    out = llm.generate("Hello there friend", SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for token, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert token in entry and entry[token].rank >= 1


def _seq(tokens, num_prompt, **params):
    seq = Sequence("r", 0, list(tokens), SamplingParams(**params))
    seq.num_prompt_tokens = num_prompt
    return seq


def test_penalties_follow_vllm_formulas():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seq = _seq([0, 1, 2, 2], num_prompt=2, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(logits, [seq], [set()])
    # repetition on every seen token (prompt and output): positive / 2, negative * 2
    # presence and frequency on output tokens only: token 2 appears twice in the output
    assert logits.tolist() == [[1.0, -4.0, 0.5 - 0.5 - 0.5, 0.5]]


def test_min_tokens_masks_stop_tokens():
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    seq = _seq([1], num_prompt=1, min_tokens=2)
    out = sample(logits, [seq], [{0}], torch.Generator().manual_seed(0))
    assert out.token_ids == [1]


def test_top_p_and_min_p_filter():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    gen = torch.Generator().manual_seed(0)
    for params in (dict(top_p=0.5), dict(min_p=0.6)):
        seq = _seq([1], 1, temperature=1.0, **params)
        assert {sample(logits, [seq], [set()], gen).token_ids[0] for _ in range(50)} == {0}
    seq = _seq([1], 1, temperature=1.0, top_p=0.85)
    assert {sample(logits, [seq], [set()], gen).token_ids[0] for _ in range(200)} == {0, 1}
