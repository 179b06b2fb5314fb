"""The cuDNN FP8 attention's own parts on the CPU: per-tensor quantization (under the Triton interpreter, conftest),
the padded lengths its graphs are built for, its error messages, and the accuracy of its scaling contract.

cuDNN itself runs only on a GPU: gpu_tests/check_kernels.py --only fp8-cudnn checks it against SDPA, float64
attention and `cudnn_fp8_attention_reference`, with needles at 32k and 128k tokens.
"""
from __future__ import annotations

import pytest
import torch

from mixquant import config
from mixquant.kernels.cudnn_attention import (cudnn_fp8_attention_reference, cudnn_fp8_prefill_attention,
                                              dequantize_tensor_fp8, padded_tokens, quantize_tensor_fp8)
from mixquant.quantization.fp8 import _ZERO_ROW_SCALE, FP8_DTYPE, FP8_MAX
from tests.kernels.test_fp8_attention import exact_attention, make_qkv, rel_err


def reference_quantize(x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """amax * float32(1/448) over the whole tensor, IEEE division, RNE cast; rows past T are 0."""
    scale = x.float().abs().amax() * torch.tensor(1 / FP8_MAX, dtype=torch.float32)
    scale = torch.where(scale == 0, torch.tensor(_ZERO_ROW_SCALE), scale)
    x8 = torch.zeros((rows, *x.shape[1:]), dtype=FP8_DTYPE)
    x8[:x.shape[0]] = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x8, scale.reshape(1)


@pytest.mark.parametrize("tokens,rows", [(1, 1), (37, 128), (300, 384)])
def test_quantize_tensor_matches_the_formula_bit_for_bit(tokens, rows):
    g = torch.Generator().manual_seed(tokens)
    fused = torch.randn(tokens, 12, 16, generator=g).to(torch.bfloat16) * 3
    fused[tokens // 2, 5, 3] = -40.0  # the tensor's amax, negative
    x = fused[:, 4:8]  # a strided view, as k inside a fused qkv row
    x8, scale = quantize_tensor_fp8(x, rows)
    want8, want_scale = reference_quantize(x, rows)
    assert x8.shape == (rows, 4, 16) and x8.dtype == FP8_DTYPE
    assert torch.equal(scale, want_scale)
    assert torch.equal(x8.view(torch.uint8), want8.view(torch.uint8))


def test_quantize_tensor_of_zeros_uses_the_zero_row_scale():
    x8, scale = quantize_tensor_fp8(torch.zeros(5, 2, 16, dtype=torch.bfloat16), 8)
    assert scale.item() == pytest.approx(_ZERO_ROW_SCALE) and not x8.float().any()


def test_quantize_tensor_refuses_fewer_rows_than_it_has():
    with pytest.raises(ValueError, match="rows=3 is fewer than the tensor's 5"):
        quantize_tensor_fp8(torch.zeros(5, 2, 16, dtype=torch.bfloat16), 3)


def test_dequantize_returns_the_first_rows_times_the_scale():
    g = torch.Generator().manual_seed(1)
    x8 = (torch.randn(40, 3, 16, generator=g) * 100).to(FP8_DTYPE)
    scale = torch.tensor([0.037])
    out = dequantize_tensor_fp8(x8, scale, 33, torch.bfloat16)
    assert out.shape == (33, 3, 16) and out.dtype == torch.bfloat16
    assert torch.equal(out, (x8[:33].float() * scale).to(torch.bfloat16))


def test_padded_lengths_cover_every_length_with_at_most_an_eighth_of_padding():
    lengths = range(1, 140_000)
    padded = [padded_tokens(t) for t in lengths]
    assert all(p >= t and p % 128 == 0 for t, p in zip(lengths, padded))
    assert all(p - t < max(128, t / 8) for t, p in zip(lengths, padded))
    assert padded_tokens(4096) == 4096 and padded_tokens(131000) == 131072
    assert len(set(padded)) < 140  # one cuDNN plan per distinct value: a bounded number of builds


def test_unavailable_reasons_name_the_problem(monkeypatch):
    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name: None)
    assert "pip install 'mixquant[cudnn]'" in config.fp8_cudnn_unavailable_reason(torch.device("cuda"))
    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name: object())
    assert config.fp8_cudnn_unavailable_reason(torch.device("cpu")) == "it needs a CUDA GPU, not cpu"
    monkeypatch.setattr(config, "compute_capability", lambda device: (8, 9))
    assert "compute capability >= 9.0" in config.fp8_cudnn_unavailable_reason(torch.device("cuda"))
    monkeypatch.setattr(config, "compute_capability", lambda device: (9, 0))
    assert config.fp8_cudnn_unavailable_reason(torch.device("cuda")) is None


@pytest.mark.parametrize("shapes,message", [(((4, 8, 64), (4, 3, 64), (4, 3, 64)), "do not split into 3"),
                                            (((4, 8, 96), (4, 2, 96), (4, 2, 96)), "head_dim 96 is not supported"),
                                            (((4, 8, 64), (5, 2, 64), (5, 2, 64)), r"must be \[4, kv_heads, 64\]")])
def test_bad_inputs_are_named_before_cudnn_is_needed(shapes, message):
    q, k, v = (torch.zeros(shape, dtype=torch.bfloat16) for shape in shapes)
    with pytest.raises(ValueError, match=message):
        cudnn_fp8_prefill_attention(q, k, v, 0.125)


def test_no_tokens_give_an_empty_output():
    q, kv = torch.zeros(0, 8, 64, dtype=torch.bfloat16), torch.zeros(0, 2, 64, dtype=torch.bfloat16)
    assert cudnn_fp8_prefill_attention(q, kv, kv, 0.125).shape == (0, 8, 64)


@pytest.mark.parametrize("tokens", [17, 300])
def test_per_tensor_scaling_costs_fp8_rounding_only(tokens):
    """The contract's error against float64 attention, on heads of magnitudes 0.5x-2x (q, k) and 0.1x-10x (v): one
    scale for all heads leaves the small heads few significant bits, which is the price of the per-tensor scale."""
    q, k, v = make_qkv(tokens, 8, 2, 64, seed=tokens)
    exact = exact_attention(q, k, v, 64 ** -0.5)
    err = rel_err(cudnn_fp8_attention_reference(q, k, v, 64 ** -0.5), exact)
    bf16 = rel_err(exact.to(torch.bfloat16), exact)
    print(f"T={tokens}: per-tensor fp8 {err:.2e}, bf16 rounding {bf16:.2e}")
    assert err < 0.1 and err > 5 * bf16
