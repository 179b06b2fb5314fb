"""Constrained decoding in the engine, on the bundled model: every kind of spec holds, a bad spec is refused with
nothing left behind, grammars compile once and without holding up other requests, reasoning runs free."""
from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
import torch

from mixquant import LLM, SamplingParams, StructuredOutputsParams, tiny
from mixquant.layers.sampler import TokenBitmask, apply_token_bitmask

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"], "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"enum": ["Paris", "Santiago", "Oslo"]}}}
ASK = [{"role": "user", "content": "Who is the employee in Paris? Answer as JSON."}]


@pytest.fixture(scope="module")
def llm():
    return LLM(tiny.NAME, dtype="float32", device="cpu", prefill_precision="bf16")


def constrained(seed: int = 0, max_tokens: int = 80, temperature: float = 0.7, **spec) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(**spec))


def chat(llm, params, thinking: bool = False):
    return [o.outputs[0] for o in llm.chat([ASK] * len(params), params, use_tqdm=False,
                                           chat_template_kwargs={"enable_thinking": thinking})]


def test_json_schema_holds_over_seeds(llm):
    outputs = chat(llm, [constrained(seed, json=PERSON) for seed in range(8)])
    for output in outputs:
        assert output.finish_reason == "stop", output
        jsonschema.validate(json.loads(output.text), PERSON)
    assert len({o.text for o in outputs}) > 1  # sampled, not one forced string


def test_regex_choice_grammar_and_json_object(llm):
    [regex, choice, grammar, json_object] = chat(llm, [
        constrained(regex=r"[A-Z][a-z]{1,8} \d{3}"),
        constrained(choice=["Paris", "Oslo", "no idea"]),
        constrained(grammar='root ::= "answer: " ("yes" | "no") "."'),
        constrained(json_object=True, max_tokens=120)])
    assert re.fullmatch(r"[A-Z][a-z]{1,8} \d{3}", regex.text), regex.text
    assert choice.text in ("Paris", "Oslo", "no idea")
    assert grammar.text in ("answer: yes.", "answer: no.")
    assert json_object.finish_reason == "stop" and isinstance(json.loads(json_object.text), dict)
    assert all(o.finish_reason == "stop" for o in (regex, choice, grammar))


def test_the_grammar_ends_the_request_even_with_ignore_eos(llm):
    params = constrained(choice=["Paris", "Oslo"])
    params.ignore_eos = True
    [output] = chat(llm, [params])
    assert output.text in ("Paris", "Oslo") and output.finish_reason == "stop"


def test_reasoning_runs_free_until_its_end_token(llm):
    # greedy: sampled, the tiny model's reasoning may ramble on past max_tokens
    [output] = chat(llm, [constrained(json=PERSON, reasoning_end="</think>", temperature=0)], thinking=True)
    reasoning, end, content = output.text.partition("</think>")
    assert end and reasoning.startswith("<think>"), output.text
    jsonschema.validate(json.loads(content), PERSON)


@pytest.mark.parametrize("spec,says", [
    (dict(json={"type": "strin"}), "strin"),
    (dict(json={"type": "array", "items": {"type": "integer"}, "uniqueItems": True}), "'uniqueItems'"),
    (dict(json={"not": {"type": "string"}}), "'not'"),
    (dict(json={"type": "string", "format": "regex"}), "'regex'"),
    (dict(json='{"type": '), "not valid JSON"),
    (dict(regex="[a-"), "regex"),
    (dict(grammar='root ::= "a" | b'), "b"),
    (dict(choice=[]), "choice"),
    (dict(json=PERSON, regex="a"), "exactly one"),
    (dict(json=PERSON, reasoning_end="not one token"), "reasoning_end"),
])
def test_a_bad_spec_is_refused_and_leaves_nothing(llm, spec, says):
    engine = llm.engine
    free = engine.block_manager.num_free_blocks
    with pytest.raises(ValueError, match=re.escape(says)):
        engine.add_request("bad", [1, 2, 3], SamplingParams(structured_outputs=StructuredOutputsParams(**spec)))
    assert not engine.has_unfinished_requests() and not engine.waiting_for_grammar
    assert engine.block_manager.num_free_blocks == free


def test_min_tokens_with_a_grammar_is_refused():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_outputs=StructuredOutputsParams(choice=["a"]))


def test_a_grammar_compiles_once_per_spec(llm):
    engine = llm.engine
    spec = {"type": "object", "properties": {"compiled_once": {"type": "boolean"}}, "required": ["compiled_once"]}
    futures = [engine.structured_output.compile(StructuredOutputsParams(json=json.dumps(spec))) for _ in range(2)]
    futures.append(engine.structured_output.compile(StructuredOutputsParams(json=spec)))
    assert futures[0] is futures[1] is futures[2]


@pytest.fixture
def held_compiles(llm, monkeypatch):
    """Grammar compiles wait (in the worker) until the test releases them: a compile as slow as the test needs."""
    release = threading.Event()
    manager = llm.engine.structured_output
    compile_now = manager._compile
    monkeypatch.setattr(manager, "_compile", lambda grammar: release.wait(30) and compile_now(grammar))
    yield release
    release.set()


def test_a_compiling_grammar_does_not_hold_up_other_requests(llm, held_compiles):
    engine = llm.engine
    engine.add_request("slow", [5, 6, 7], constrained(json=PERSON | {"title": "held"}))
    engine.add_request("free", [5, 6, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    finished = {}
    while "free" not in finished:
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert len(finished["free"].outputs[0].token_ids) == 6
    assert "slow" in engine.waiting_for_grammar and not engine.requests["slow"].seqs[0].output_token_ids
    held_compiles.set()
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    jsonschema.validate(json.loads(finished["slow"].outputs[0].text), PERSON)


def test_a_request_waiting_for_its_grammar_counts_as_waiting(llm, held_compiles):
    engine = llm.engine
    engine.add_request("held", [5, 6, 7], constrained(json=PERSON | {"title": "counted"}))
    assert engine.stats()["num_requests_waiting"] == 1
    engine.abort_request("held")


def test_a_grammar_that_fails_to_compile_ends_its_request_alone(llm, monkeypatch):
    engine = llm.engine
    free = engine.block_manager.num_free_blocks

    def fail(grammar):
        raise RuntimeError("the compiler broke")

    monkeypatch.setattr(engine.structured_output, "_compile", fail)
    engine.add_request("broken", [5, 6, 7], constrained(json=PERSON | {"title": "broken"}))
    engine.add_request("fine", [5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert finished["broken"].outputs[0].finish_reason == "abort" and not finished["broken"].outputs[0].token_ids
    assert len(finished["fine"].outputs[0].token_ids) == 3
    assert engine.block_manager.num_free_blocks == free


def test_each_of_n_sequences_has_its_own_grammar(llm):
    [output] = llm.chat([ASK], SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=80,
                                              structured_outputs=StructuredOutputsParams(json=PERSON)),
                        use_tqdm=False, chat_template_kwargs={"enable_thinking": False})
    for completion in output.outputs:
        jsonschema.validate(json.loads(completion.text), PERSON)


def test_kv_blocks_come_back_after_aborts(llm, held_compiles):
    engine = llm.engine
    free = engine.block_manager.num_free_blocks
    engine.add_request("compiling", [5, 6, 7], constrained(json=PERSON | {"title": "aborted while compiling"}))
    held_compiles.set()
    engine.add_request("running", [5, 6, 7], constrained(json=PERSON))
    while not engine.requests["running"].seqs[0].output_token_ids:
        engine.step()
    assert engine.block_manager.num_free_blocks < free
    assert engine.abort_request("compiling") and engine.abort_request("running")
    assert not engine.has_unfinished_requests() and not engine.waiting_for_grammar
    assert engine.block_manager.num_free_blocks == free


def test_bitmask_masks_exactly_the_disallowed_tokens():
    vocab = 70  # three int32 words, the last one partly past the vocabulary
    allowed = {0, 31, 32, 63, 69}
    bits = torch.full((2, 3), -1, dtype=torch.int32)  # row 0 is not in the bitmask: its bits must not count
    bits[1] = 0
    for token in allowed:
        bits[1, token // 32] |= torch.tensor(1 << (token % 32)).to(torch.int32)  # bit 31 is the sign bit
    logits = torch.randn(2, vocab)
    masked = logits.clone()
    apply_token_bitmask(masked, TokenBitmask([1], bits))
    assert torch.equal(masked[0], logits[0])
    assert {int(t) for t in torch.isfinite(masked[1]).nonzero()} == allowed
    assert torch.equal(masked[1, sorted(allowed)], logits[1, sorted(allowed)])
