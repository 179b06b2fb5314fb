"""The piecewise prefill path (CUDA graphs on a GPU; here its pieces run eagerly through the same static buffers
and padding) gives the eager forward's results in every kind of step."""
from __future__ import annotations

import pytest

from mixquant import LLM, SamplingParams
from mixquant.engine.prefill_graphs import MAX_GRAPH_ROWS, PrefillGraphs, prefill_buckets


def _with_prefill_pieces(llm, buckets):
    runner = llm.engine.runner
    runner.prefill_graphs = PrefillGraphs(runner.model, buckets, runner.scratch_block * runner.block_size,
                                          runner.device, runner.dtype, capture=False)
    used = []
    forward = runner.prefill_graphs.forward

    def recording(input_ids, positions, ctx):
        used.append(ctx.num_prefill_rows)
        return forward(input_ids, positions, ctx)

    runner.prefill_graphs.forward = recording
    return used


def _run(llm, prompts, params, stagger: bool):
    """Greedy tokens and their logprobs; staggered requests join while others decode (mixed steps)."""
    engine = llm.engine
    results = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
        if stagger:
            engine.step()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = (out.outputs[0].token_ids,
                                           [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs,
                                                                           out.outputs[0].token_ids)],
                                           [e and [(k, v.logprob) for k, v in e.items()]
                                            for e in (out.prompt_logprobs or [])])
    return [results[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("pair", ["bf16/bf16", "fp8/bf16", "nvfp4/bf16"])
def test_prefill_pieces_equal_the_eager_forward(tiny_qwen3, pair):
    prefill, decode = pair.split("/")
    prompts = [list(range(10, 47)), list(range(50, 59)), [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5] * 3,
               list(range(10, 47)) + [7, 7, 7]]  # the last shares a cached prefix with the first
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    plain = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=0)
    for stagger, sampling in ((False, params), (True, plain)):
        def llm():
            # a small token budget: long prompts are chunked, later chunks attend to cached context
            return LLM(str(tiny_qwen3), dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=24,
                       prefill_precision=prefill, decode_precision=decode)
        expected = _run(llm(), prompts, sampling, stagger)
        pieces = llm()
        used = _with_prefill_pieces(pieces, [8, 16, 24])
        got = _run(pieces, prompts, sampling, stagger)
        # the same tokens; logprobs as close as float32 GEMMs of another row count allow
        assert [g[0] for g in got] == [e[0] for e in expected]
        for (_, lp, prompt_lp), (_, lp_ref, prompt_lp_ref) in zip(got, expected):
            assert lp == pytest.approx(lp_ref, abs=1e-4)
            assert [e and [k for k, _ in e] for e in prompt_lp] == [e and [k for k, _ in e] for e in prompt_lp_ref]
            assert [v for e in prompt_lp[1:] for _, v in e] == pytest.approx(
                [v for e in prompt_lp_ref[1:] for _, v in e], abs=1e-4)
        assert used and any(0 < n < 24 for n in used)  # padded row counts were replayed


def test_steps_outside_the_buckets_run_eagerly(tiny_qwen3):
    llm = LLM(str(tiny_qwen3), dtype="float32", device="cpu", max_num_batched_tokens=64)
    used = _with_prefill_pieces(llm, [8])
    greedy = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    llm.generate([list(range(5, 9))], greedy, use_tqdm=False)
    llm.generate([list(range(10, 40))], greedy, use_tqdm=False)
    # the 4-token prompt's 4 rows (bf16/bf16 keeps the last prompt token with them); the 30-token prompt's 30 are
    # more than 8
    assert used == [4]


def test_buckets_pad_little():
    buckets = prefill_buckets(8192)
    assert buckets[0] == 16 and buckets[-1] == MAX_GRAPH_ROWS and buckets == sorted(buckets)
    for rows in range(1024, MAX_GRAPH_ROWS + 1, 97):
        padded = next(b for b in buckets if b >= rows)
        assert padded - rows <= rows / 8
    assert prefill_buckets(100)[-1] == 96 and prefill_buckets(8) == [8]
