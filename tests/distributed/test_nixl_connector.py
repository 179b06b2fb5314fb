"""A prefill and a decode engine in one process, KV moved by NIXL: outputs, prefix reuse, failures, no leaked block."""
from __future__ import annotations

import time
from dataclasses import replace
from types import SimpleNamespace

import pytest

from mixquant.distributed.kv_transfer import KVTransferConfig, RemotePrefill
from mixquant.engine.sequence import SequenceStatus
from mixquant.quantization.linear_methods import FP8Method, NoDecodeMethod
from mixquant.sampling_params import SamplingParams
from tests.distributed.conftest import GREEDY, make_engine, prefill, run, with_kv

BLOCK = 16


@pytest.fixture(scope="module")
def instances(tiny_qwen3, tiny_fp8):
    """P: prefill-only from the FP8 checkpoint; D: decodes in BF16 and would prefill in BF16 too (so output equal to
    the co-located fp8/bf16 engine's shows the KV came from P); co: the co-located fp8/bf16 engine."""
    p = make_engine(tiny_qwen3, "kv_producer", prefill_model=str(tiny_fp8))
    d = make_engine(tiny_qwen3, "kv_consumer", prefill="bf16")
    co = make_engine(tiny_qwen3)
    yield SimpleNamespace(p=p, d=d, co=co, prompts=prompts(co.tokenizer))
    p.shutdown()
    d.shutdown()


def prompts(tokenizer) -> list[list[int]]:
    """One token (nothing to prefill remotely), block-aligned prefill parts (17, 33 tokens) and partial ones."""
    text = tokenizer("The tool returned a long table of records: id 7, id 9, id 12, id 40, id 41, " * 4)["input_ids"]
    return [text[:n] for n in (1, 2, 17, 18, 33, 45)]


def at_baseline(*engines, timeout: float = 30):
    """Steps the engines (each may wait on another's notice) until no transfer is pending; then no block is used."""
    deadline = time.monotonic() + timeout
    while any(engine.kv_connector is not None and engine.kv_connector.busy for engine in engines):
        assert time.monotonic() < deadline, "KV transfers still pending"
        for engine in engines:
            engine.step()
    assert [engine.block_manager.usage() for engine in engines] == [0] * len(engines)


def test_a_prefill_instance_holds_only_the_quantized_weights(instances):
    layers = [layer for layer in instances.p.runner.model.linear_layers() if ".layers." in layer.prefix]
    assert layers
    for layer in layers:
        assert layer.weight is None
        assert isinstance(layer.prefill_method, FP8Method) and isinstance(layer.decode_method, NoDecodeMethod)
    with pytest.raises(ValueError, match="only prefills"):
        instances.p.add_request("plain", [1, 2, 3], GREEDY)


def test_the_decode_instance_continues_from_the_prefill_instances_kv(instances):
    p, d, co = instances.p, instances.d, instances.co
    for i, prompt in enumerate(instances.prompts):
        kv = prefill(p, f"p{i}", prompt)
        assert kv["remote_num_tokens"] == len(prompt) - 1 and len(kv["remote_block_ids"]) == -(-(len(prompt) - 1) // BLOCK)
        got = run(d, f"d{i}", prompt, with_kv(GREEDY, kv)).outputs[0].token_ids
        assert got == run(co, f"c{i}", prompt, GREEDY).outputs[0].token_ids, f"prompt of {len(prompt)} tokens"
    stats = d.stats()
    assert stats["tokens_computed"].get("prefill/bf16", 0) == 0  # every prompt token but the last came from P
    reads = [q for q in instances.prompts if len(q) > 1]
    assert stats["kv_transfer"]["read_seconds"]["count"] == len(reads) and not stats["kv_transfer"]["fallbacks"]
    # the prompts share their beginnings: blocks read for one are found in D's prefix cache by the next
    offered = sum(-(-(len(q) - 1) // BLOCK) for q in reads)
    assert len(reads) <= stats["kv_transfer"]["blocks_read"] < offered and stats["prefix_cache_hits"] > 0
    at_baseline(p, d)

    # again: D's prefix cache has the read blocks (under P's precision), so only a partial last block is read
    before = d.stats()["kv_transfer"]["blocks_read"]
    prompt = instances.prompts[4]  # 33 tokens: the 32 read before fill two blocks
    kv = prefill(p, "p-again", prompt)
    got = run(d, "d-again", prompt, with_kv(GREEDY, kv)).outputs[0].token_ids
    assert got == run(co, "c-again", prompt, GREEDY).outputs[0].token_ids
    assert d.stats()["kv_transfer"]["blocks_read"] == before
    at_baseline(p, d)  # P was told it need not keep them


def test_kv_of_another_prompt_is_not_read(instances):
    p, d = instances.p, instances.d
    prompt = instances.prompts[5]
    other = [prompt[0] + 1, *prompt[1:]]
    kv = prefill(p, "p-other", prompt)
    got = run(d, "d-other", other, with_kv(GREEDY, kv)).outputs[0].token_ids
    assert got == run(d, "d-plain", other, GREEDY).outputs[0].token_ids  # computed by D itself
    assert d.stats()["kv_transfer"]["fallbacks"]["prompt_mismatch"] == 1
    at_baseline(p, d)


def test_aborted_requests_leave_no_blocks_held(instances):
    p, d = instances.p, instances.d
    prompt = instances.prompts[5]
    d.add_request("loading", prompt, with_kv(GREEDY, prefill(p, "p-loading", prompt)))
    d.step()  # admitted: its read starts
    assert d.requests["loading"].seqs[0].status is SequenceStatus.WAITING_FOR_REMOTE_KV
    d.abort_request("loading")
    d.add_request("queued", prompt, with_kv(GREEDY, prefill(p, "p-queued", prompt)))
    d.abort_request("queued")  # never admitted: P is told to free
    at_baseline(p, d)


def test_a_prefill_instance_that_is_gone_leaves_the_decode_instance_to_compute(tiny_qwen3, instances):
    gone = make_engine(tiny_qwen3, "kv_producer")
    prompt = [token + 1 for token in instances.prompts[4]]  # not in D's prefix cache
    kv = prefill(gone, "p-gone", prompt)
    gone.shutdown()  # its side channel closes: no handshake
    d = instances.d
    got = run(d, "d-gone", prompt, with_kv(GREEDY, kv)).outputs[0].token_ids
    assert got == run(d, "d-local", prompt, GREEDY).outputs[0].token_ids
    stats = d.stats()["kv_transfer"]
    assert stats["fallbacks"]["transfer_failed"] == 1 and stats["failed_reads"] == 1
    at_baseline(d)


def test_blocks_nobody_reads_are_freed_after_the_timeout(tiny_qwen3, instances):
    p = make_engine(tiny_qwen3, "kv_producer", extra={"abort_request_timeout": 0.5})
    d = make_engine(tiny_qwen3, "kv_consumer", block_size=8)  # cannot read blocks of 16 tokens
    try:
        prompt = instances.prompts[5]
        kv = prefill(p, "p-unread", prompt)
        assert p.block_manager.usage() > 0
        got = run(d, "d-unread", prompt, with_kv(GREEDY, kv)).outputs[0].token_ids
        assert got == run(d, "d-local", prompt, GREEDY).outputs[0].token_ids
        assert d.stats()["kv_transfer"]["fallbacks"]["layout_mismatch"] == 1
        at_baseline(p, d)
        assert p.stats()["kv_transfer"]["expired_requests"] == 1
    finally:
        p.shutdown()
        d.shutdown()


def test_a_decode_instance_out_of_kv_space_queues(tiny_qwen3, instances):
    p, co = instances.p, instances.co
    d = make_engine(tiny_qwen3, "kv_consumer", num_kv_blocks=4, max_model_len=64)  # one request of 45 + 8 at a time
    try:
        prompts = [instances.prompts[5], instances.prompts[5][1:] + [instances.prompts[5][0]]]
        for i, prompt in enumerate(prompts):
            d.add_request(f"full-{i}", prompt, with_kv(GREEDY, prefill(p, f"p-full-{i}", prompt)))
        finished, queued = {}, False
        while len(finished) < 2:
            queued |= bool(d.scheduler.waiting) and bool(d.scheduler.running or d.scheduler.loading)
            finished.update((o.request_id, o.outputs[0].token_ids) for o in d.step() if o.finished)
        assert queued
        for i, prompt in enumerate(prompts):
            assert finished[f"full-{i}"] == run(co, f"c-full-{i}", prompt, GREEDY).outputs[0].token_ids
        assert d.stats()["kv_transfer"]["blocks_read"] == sum(-(-(len(q) - 1) // BLOCK) for q in prompts)
        at_baseline(p, d)
    finally:
        d.shutdown()


def test_requests_that_do_not_fit_the_role_are_refused(instances, tiny_qwen3):
    kv = {"do_remote_decode": True}
    with pytest.raises(ValueError, match="does not prefill for others"):
        instances.d.add_request("r", [1, 2, 3], with_kv(GREEDY, kv))
    with pytest.raises(ValueError, match="--kv-transfer-config"):
        instances.co.add_request("r", [1, 2, 3], with_kv(GREEDY, kv))
    with pytest.raises(ValueError, match="remote_engine_id: expected str, got None"):
        instances.d.add_request("r", [1, 2, 3], with_kv(GREEDY, {"do_remote_prefill": True}))
    assert not instances.d.requests


@pytest.mark.parametrize("values, message", [
    ({"kv_role": "kv_both"}, "needs \"kv_connector\""),
    ({"kv_connector": "P2pNcclConnector"}, "use NixlConnector"),
    ({"kv_connector": "NixlConnector", "kv_role": "prefill"}, "kv_role 'prefill' is not one of"),
    ({"kv_connector": "NixlConnector", "kv_buffer_size": 1e9}, "unknown keys kv_buffer_size"),
    ({"kv_connector": "NixlConnector", "kv_load_failure_policy": "fail"}, "computes the prompt itself"),
    ({"kv_connector": "NixlConnector", "kv_connector_extra_config": {"abort_request_timeout": 0}}, "must be > 0"),
    ({"kv_connector": "NixlConnector", "kv_port": 70000}, "kv_port must be a port number"),
])
def test_kv_transfer_config_errors_name_the_problem(values, message):
    with pytest.raises(ValueError, match=message):
        KVTransferConfig.from_dict(values)


def test_remote_prefill_params_are_checked():
    good = {"do_remote_prefill": True, "remote_engine_id": "e", "remote_request_id": "r", "remote_host": "h",
            "remote_port": 1, "remote_block_ids": [3, 4], "remote_block_size": 16, "remote_num_tokens": 20,
            "remote_kv_precision": "fp8", "remote_prompt_digest": "d", "tp_size": 1}
    assert RemotePrefill.from_params(good).block_ids == [3, 4]
    for change, message in (({"remote_port": "1"}, "remote_port: expected int"),
                            ({"remote_num_tokens": 40}, "cannot hold remote_num_tokens=40"),
                            ({"remote_block_ids": [3, -4]}, "non-negative"),
                            ({"tp_size": 2}, "only tp_size 1")):
        with pytest.raises(ValueError, match=message):
            RemotePrefill.from_params({**good, **change})


def test_n_above_1_computes_the_prompt_once_on_each_side(instances):
    """The prefill instance computes the prompt once whatever n; a decode instance computes it for n > 1."""
    p, d = instances.p, instances.d
    prompt = instances.prompts[3]
    params = SamplingParams(temperature=1.0, n=3, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    output = run(p, "p-n", prompt, params)
    assert [c.token_ids for c in output.outputs] == [[]] and output.outputs[0].finish_reason == "length"
    got = run(d, "d-n", prompt, SamplingParams(n=2, seed=1, max_tokens=4, ignore_eos=True,
                                               kv_transfer_params=output.kv_transfer_params))
    assert [len(c.token_ids) for c in got.outputs] == [4, 4]
    assert d.stats()["kv_transfer"]["fallbacks"]["n_above_1"] == 1
    at_baseline(p, d)


def test_prompt_logprobs_are_computed_where_they_are_asked(instances):
    p, d = instances.p, instances.d
    prompt = [token + 2 for token in instances.prompts[4]]
    scored = with_kv(SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1), prefill(p, "p-lp", prompt))
    got = run(d, "d-lp", prompt, scored)
    assert len(got.prompt_logprobs) == len(prompt)
    assert got.prompt_logprobs == run(d, "d-lp-local", prompt, replace(scored, kv_transfer_params=None)).prompt_logprobs
    assert d.stats()["kv_transfer"]["fallbacks"]["prompt_logprobs"] == 1
    at_baseline(p, d)


def test_a_prefill_instance_warms_up_without_decoding(tiny_qwen3, tiny_fp8):
    """The GPU start-up warm-up (run here on the CPU) computes prompts only: a decode row would raise."""
    engine = make_engine(tiny_qwen3, "kv_producer", prefill_model=str(tiny_fp8), max_num_batched_tokens=64)
    connector, engine.kv_connector = engine.kv_connector, None  # on a GPU it warms up before the connector exists
    try:
        engine.warm_up()
        assert not engine.has_unfinished_requests() and engine.block_manager.usage() == 0
        assert engine.tokens_computed == {}
    finally:
        connector.close()
