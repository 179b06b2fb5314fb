"""Qwen3.5's layers one by one against transformers' own modules: the Gated DeltaNet reference (conv and delta rule,
split into segments and chunks as the engine splits a prompt), the (1 + w) and gated norms in bf16, partial rotary."""
from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

from mixquant.engine.prefill_graphs import PrefillGraphs
from mixquant.layers.gated_delta_net import causal_conv1d_reference, gated_delta_rule_reference, initial_state
from mixquant.layers.layernorm import GatedRMSNorm, RMSNorm
from mixquant.utils.context import StateSegments

KEY_HEADS, VALUE_HEADS, KEY_DIM, VALUE_DIM = 2, 4, 16, 8


def segments(lengths: list[int], resume: list[bool]) -> StateSegments:
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return StateSegments(torch.arange(len(lengths)), torch.tensor(resume), bounds, torch.tensor(bounds), len(lengths))


def delta_rule_inputs(rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, KEY_HEADS, KEY_DIM, generator=g), torch.randn(rows, KEY_HEADS, KEY_DIM, generator=g),
            torch.randn(rows, VALUE_HEADS, VALUE_DIM, generator=g), -torch.rand(rows, VALUE_HEADS, generator=g),
            torch.rand(rows, VALUE_HEADS, generator=g))


def hf_delta_rule(q, k, v, g, beta, initial_state=None):
    return hf.torch_chunk_gated_delta_rule(q[None], k[None], v[None], g[None], beta[None],
                                           initial_state=initial_state, output_final_state=True,
                                           use_qk_l2norm_in_kernel=True)


def test_delta_rule_over_pieces_equals_transformers_in_one():
    """A 150-token sequence from a given state, run as 70 rows (chunked form across two chunks), 1 row (the
    per-token form) and 79 rows, each piece starting from the state the last one left: transformers' output for
    the whole and its final state."""
    q, k, v, g, beta = delta_rule_inputs(150)
    initial = torch.randn(1, VALUE_HEADS, KEY_DIM, VALUE_DIM)
    expected, expected_state = hf_delta_rule(q, k, v, g, beta, initial)
    state, pieces = initial.clone(), []
    for start, end in ((0, 70), (70, 71), (71, 150)):
        rows = slice(start, end)
        pieces.append(gated_delta_rule_reference(q[rows], k[rows], v[rows], g[rows], beta[rows], state,
                                                 segments([end - start], [True])))
    torch.testing.assert_close(torch.cat(pieces), expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, expected_state, rtol=1e-5, atol=1e-5)


def test_delta_rule_segments_are_independent_and_fresh_ones_ignore_their_slot():
    q, k, v, g, beta = delta_rule_inputs(90, seed=1)
    carried = torch.randn(1, VALUE_HEADS, KEY_DIM, VALUE_DIM)
    pool = torch.cat([carried, torch.full_like(carried, 7.0)])  # the second slot's old content must not leak in
    parts = segments([60, 30], [True, False])
    state = initial_state(pool, parts)
    out = gated_delta_rule_reference(q, k, v, g, beta, state, parts)
    first, first_state = hf_delta_rule(q[:60], k[:60], v[:60], g[:60], beta[:60], carried)
    second, second_state = hf_delta_rule(q[60:], k[60:], v[60:], g[60:], beta[60:])
    torch.testing.assert_close(out, torch.cat([first[0], second[0]]), rtol=0, atol=0)
    torch.testing.assert_close(state, torch.cat([first_state, second_state]), rtol=0, atol=0)


def test_decode_rows_step_each_sequence_once():
    """Rows of different sequences, one token each (a decode batch): transformers' per-token form on each."""
    q, k, v, g, beta = delta_rule_inputs(3, seed=2)
    state = torch.randn(3, VALUE_HEADS, KEY_DIM, VALUE_DIM)
    expected = [hf.torch_recurrent_gated_delta_rule(q[i:i + 1, None], k[i:i + 1, None], v[i:i + 1, None],
                                                    g[i:i + 1, None], beta[i:i + 1, None],
                                                    initial_state=state[i:i + 1], output_final_state=True,
                                                    use_qk_l2norm_in_kernel=True) for i in range(3)]
    out = gated_delta_rule_reference(q, k, v, g, beta, state, segments([1, 1, 1], [True] * 3))
    torch.testing.assert_close(out, torch.cat([o[0] for o, _ in expected]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state, torch.cat([s for _, s in expected]), rtol=1e-6, atol=1e-6)


def test_causal_conv_carries_its_window_across_pieces():
    channels, kernel = 12, 4
    x, weight = torch.randn(40, channels), torch.randn(channels, kernel)
    expected = hf.causal_conv1d_fn(x.t()[None], weight, activation="silu")[0].t()
    pool, pieces = torch.full((1, channels, kernel), 5.0), []  # stale content: the first piece starts fresh
    for start, end in ((0, 2), (2, 3), (3, 40)):
        parts = segments([end - start], [start > 0])
        state = initial_state(pool, parts)
        pieces.append(causal_conv1d_reference(x[start:end], weight, state, parts))
        pool[parts.slots] = state
        if start == 0:
            assert torch.equal(state[0, :, -2:], x[:2].t()) and not state[0, :, :2].any()
    torch.testing.assert_close(torch.cat(pieces), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state[0], x[-kernel:].t(), rtol=0, atol=0)


def test_causal_conv_decode_rows():
    channels, kernel = 12, 4
    weight, history, x = torch.randn(channels, kernel), torch.randn(3, channels, kernel), torch.randn(3, channels)
    expected = [hf.causal_conv1d_update(x[i][None, :, None], history[i:i + 1].clone(), weight, activation="silu")
                for i in range(3)]
    state = history.clone()
    out = causal_conv1d_reference(x, weight, state, segments([1, 1, 1], [True] * 3))
    torch.testing.assert_close(out, torch.cat([e[0, :, 0][None] for e in expected]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state, torch.cat([history[:, :, 1:], x[:, :, None]], dim=-1), rtol=0, atol=0)


def test_norms_round_as_transformers_does_in_bf16():
    """(1 + w) applied in fp32 before the cast back, and the gated norm's gate in fp32: bit for bit in bf16, where
    the order of the casts shows."""
    torch.manual_seed(0)
    x, residual, gate = (torch.randn(6, 64, dtype=torch.bfloat16) * 3 for _ in range(3))
    ours, theirs = RMSNorm(64, 1e-6, unit_offset=True).to(torch.bfloat16), hf.Qwen3_5RMSNorm(64, 1e-6)
    gated_ours, gated_theirs = GatedRMSNorm(64, 1e-6).to(torch.bfloat16), hf.Qwen3_5RMSNormGated(64, 1e-6)
    with torch.no_grad():
        for a, b in ((ours, theirs), (gated_ours, gated_theirs)):
            b.weight.copy_(torch.randn(64) * 0.1)
            b.to(torch.bfloat16)
            a.weight.copy_(b.weight)
        assert torch.equal(ours(x), theirs(x))
        normed, summed = ours(x, residual)
        assert torch.equal(summed, x + residual) and torch.equal(normed, theirs(x + residual))
        assert torch.equal(gated_ours(x, gate), gated_theirs(x, gate))


def test_partial_rotary_turns_only_the_leading_dims(tiny_qwen3_5):
    """Transformers' Qwen3.5 rotation (64 of 256 dims at 9B; 8 of 32 here), through a whole model's attention layer
    tested in test_qwen3_5.py; here: the pass-through dims come out untouched."""
    from mixquant.layers.rotary_embedding import RotaryEmbedding
    from mixquant.utils.hf import load_config

    config = load_config(tiny_qwen3_5)
    rotary = RotaryEmbedding(config, config.head_dim, 64)
    assert rotary.cos.shape[-1] == 8
    q, k = torch.randn(5, 4, 32), torch.randn(5, 2, 32)
    positions = torch.arange(10, 15)
    q_out, k_out = rotary(positions, q, k)
    assert torch.equal(q_out[..., 8:], q[..., 8:]) and torch.equal(k_out[..., 8:], k[..., 8:])
    theirs = hf.Qwen3_5TextRotaryEmbedding(config)
    cos, sin = theirs(q, positions[None])
    expected_q, expected_k = hf.apply_rotary_pos_emb(q[None].transpose(1, 2), k[None].transpose(1, 2), cos, sin)
    torch.testing.assert_close(q_out, expected_q[0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(k_out, expected_k[0].transpose(0, 1), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["tiny_qwen3_5", "tiny_qwen3"])
def test_prefill_graphs_say_why_they_cannot_cover_hybrid_layers(arch, request):
    from mixquant.models import loader
    from mixquant.utils.hf import load_config

    model = loader.build_model(load_config(request.getfixturevalue(arch)), torch.float32, torch.device("cpu"), 64)
    reason = PrefillGraphs.unsupported_reason(model)
    if arch == "tiny_qwen3":
        assert reason is None
    else:
        assert reason.startswith("4 of 4 layers")
