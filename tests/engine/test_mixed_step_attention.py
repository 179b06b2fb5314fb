"""Decode rows that share a step with a prefill attend in one batched paged-cache read, with the same result as
attending one segment each (the path every other prefill row takes)."""
from __future__ import annotations

import torch

from mixquant import LLM, SamplingParams
from mixquant.layers.attention import TorchAttentionBackend
from mixquant.utils.context import AttentionSegment, ForwardContext


def test_decode_tail_equals_one_segment_per_row():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(7, heads, 16, generator=g) for heads in (4, 2, 2))
    k_cache, v_cache = (torch.randn(8, 4, 2, 16, generator=g) for _ in range(2))  # 8 blocks of 4 positions
    fresh, cached, first = torch.tensor([0, 1]), torch.tensor([5, 2, 7]), torch.tensor([3])
    # each row's K/V is in the cache before attention, as Attention.forward writes it: positions 0-4 of `fresh`,
    # position 9 of `cached` (block 7, offset 1), position 0 of `first`
    slots = torch.tensor([0, 1, 2, 3, 4, 7 * 4 + 1, 3 * 4])
    for cache, rows in ((k_cache, k), (v_cache, v)):
        cache.view(-1, 2, 16)[slots] = rows
    # rows [a fresh 5-token prefill | a decode token at position 9 | a decode token at position 0]
    per_segment = ForwardContext(5, slots, segments=[AttentionSegment(0, 5, 0, fresh), AttentionSegment(5, 6, 9, cached),
                                                    AttentionSegment(6, 7, 0, first)])
    tail = ForwardContext(5, slots, segments=[AttentionSegment(0, 5, 0, fresh)],
                          block_tables=torch.tensor([[5, 2, 7], [3, 0, 0]]), context_lens=torch.tensor([10, 1]))
    backend = TorchAttentionBackend()
    expected = backend.forward(q, k, v, k_cache, v_cache, per_segment, 0.25)
    torch.testing.assert_close(backend.forward(q, k, v, k_cache, v_cache, tail, 0.25), expected)


def test_engine_sends_decode_rows_beside_a_prefill_to_the_batched_path(tiny_qwen3, monkeypatch):
    # no prefix caching: b's prompt must be computed in the step, not found cached from the reference run; phases
    # that differ, so that b's last prompt token is a decode row (a uniform pair keeps it with its prompt's rows)
    llm = LLM(str(tiny_qwen3), dtype="float32", device="cpu", block_size=4, enable_prefix_caching=False,
              prefill_precision="fp8")
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompt_a, prompt_b = list(range(10, 23)), list(range(40, 49))
    alone = [o.outputs[0].token_ids for o in llm.generate([prompt_a, prompt_b], greedy, use_tqdm=False)]

    batched_rows = []
    decode = TorchAttentionBackend._decode

    def recording(q, k_cache, v_cache, block_tables, context_lens, scale, window=None):
        batched_rows.append(q.shape[0])
        # the dtypes of the decode graphs' inputs, so that on a GPU this call runs the kernel variant they compiled
        assert block_tables.dtype == context_lens.dtype == torch.int32
        return decode(q, k_cache, v_cache, block_tables, context_lens, scale, window)

    engine = llm.engine
    engine.add_request("a", prompt_a, greedy)
    engine.step()  # a's prompt
    engine.step()  # a decodes alone
    monkeypatch.setattr(TorchAttentionBackend, "_decode", staticmethod(recording))
    engine.add_request("b", prompt_b, greedy)
    outputs = {}

    def step():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids

    step()  # b's prompt, a's decode token beside it
    layers = len(llm.engine.runner.model.attention_layers())
    # that step's a decode token and b's last prompt token (decode precision, by the phase rule): one call of two rows
    assert batched_rows == [2] * layers
    while engine.has_unfinished_requests():
        step()
    assert [outputs["a"], outputs["b"]] == alone
