"""per_token_quant_fp8 under the Triton interpreter (conftest) against quantize_rowwise's arithmetic on CUDA.

On a CUDA device torch computes quantize_rowwise's `amax / 448` as amax * float32(1/448) (it divides by a Python
scalar through the reciprocal) while the CPU divides: the two differ by one ulp in about half the rows. The kernel
follows CUDA, where it runs, so its scales are checked against that arithmetic spelled out here, and against the
CPU's quantize_rowwise to within one ulp. gpu_tests/check_kernels.py checks bit equality with quantize_rowwise
on the GPU itself.
"""
from __future__ import annotations

import pytest
import torch

from mixquant.kernels.quant import per_token_quant_fp8
from mixquant.quantization import fp8


def cuda_quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8.quantize_rowwise with torch's CUDA rounding of `amax / 448`."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) * torch.tensor(1 / fp8.FP8_MAX, dtype=torch.float32)
    scale = torch.where(scale == 0, fp8._ZERO_ROW_SCALE, scale)
    return (xf / scale).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8_DTYPE), scale


def random_rows(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows whose magnitudes span many binades (activations have outlier rows), with an all-zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-4, 4, m).unsqueeze(1)
    x[m // 2] = 0
    return x.to(dtype)


def assert_matches(x: torch.Tensor) -> None:
    q, scale = per_token_quant_fp8(x)
    q_ref, scale_ref = cuda_quantize_rowwise(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (x.shape[0], 1)
    assert torch.equal(scale, scale_ref)
    # the interpreter casts through torch (conftest), so the bytes must match exactly too
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    _, scale_cpu = fp8.quantize_rowwise(x)
    assert torch.equal(scale, scale_cpu) or (scale.view(torch.int32) - scale_cpu.view(torch.int32)).abs().max() <= 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [16, 48, 4096])
def test_rows_held_whole_match_cuda_quantize_rowwise(dtype, k):
    assert_matches(random_rows(9, k, dtype, seed=k))


def test_long_rows_read_in_chunks_match():
    assert_matches(random_rows(3, 16384 + 4096 + 16, torch.bfloat16, seed=1))


def test_strided_rows_and_dequantized_error():
    """A row slice of a wider activation; q * scale stays within half an fp8 step (2**-4 relative) of x."""
    wide = random_rows(6, 96, torch.bfloat16, seed=2)
    x = wide[:, 16:80]
    assert_matches(x)
    q, scale = per_token_quant_fp8(x)
    error = (fp8.dequantize_rowwise(q, scale) - x.float()).abs()
    assert (error <= x.float().abs() * 2 ** -4 + scale * 2 ** -10).all()  # the 2**-10 term covers subnormals


def test_nan_row_becomes_nan_like_quantize_rowwise():
    x = random_rows(4, 32, torch.float32, seed=3)
    x[1, 5] = float("nan")
    q, scale = per_token_quant_fp8(x)
    assert scale[1].isnan().all() and q[1].float().isnan().all()
    assert torch.equal(q[[0, 2, 3]].view(torch.uint8), cuda_quantize_rowwise(x)[0][[0, 2, 3]].view(torch.uint8))


def test_no_rows():
    q, scale = per_token_quant_fp8(torch.empty(0, 64, dtype=torch.bfloat16))
    assert q.shape == (0, 64) and q.dtype == torch.float8_e4m3fn and scale.shape == (0, 1)


@pytest.mark.parametrize("k", [48, 4096, 16384 + 4096 + 16])
def test_gated_rows_match_quantizing_the_silu_product(k):
    """silu_and_mul_quant_fp8 equals per-token quantization of SiluAndMul's product, itself rounded to bf16."""
    from mixquant.kernels.quant import silu_and_mul_quant_fp8
    from mixquant.layers.activation import silu_and_mul

    x = random_rows(5, 2 * k, torch.bfloat16, seed=k) * 0.5
    q, scale = silu_and_mul_quant_fp8(x)
    q_ref, scale_ref = cuda_quantize_rowwise(silu_and_mul(x))
    assert q.shape == (5, k) and scale.shape == (5, 1)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_gelu_gated_rows_match_quantizing_the_gelu_product():
    """gated_quant_fp8 with Gemma's tanh GELU against quantizing gelu_tanh_and_mul's bf16 product. The kernel's
    tanh (through a sigmoid) may differ from torch's in the last float32 bit, which may move a bf16 rounding and so,
    rarely, a code by one."""
    from mixquant.kernels.quant import gated_quant_fp8
    from mixquant.layers.activation import gelu_tanh_and_mul

    x = random_rows(5, 2 * 4096, torch.bfloat16, seed=7) * 0.5
    q, scale = gated_quant_fp8(x, "gelu_pytorch_tanh")
    q_ref, scale_ref = cuda_quantize_rowwise(gelu_tanh_and_mul(x))
    assert q.shape == (5, 4096)
    assert ((scale - scale_ref).abs() <= scale_ref * 2 ** -7).all()
    apart = fp8_codes_apart(q, q_ref)
    assert apart.max() <= 1 and (apart == 0).float().mean() >= 0.99
    with pytest.raises(ValueError, match="no fused kernel"):
        gated_quant_fp8(x, "relu")


def test_gated_rows_must_pair_gate_and_up():
    from mixquant.kernels.quant import silu_and_mul_quant_fp8

    with pytest.raises(ValueError, match="even width"):
        silu_and_mul_quant_fp8(torch.zeros(2, 7, dtype=torch.bfloat16))


def fp8_codes_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many E4M3 codes apart two same-sign values are (codes are ordered by magnitude within a sign)."""
    return (a.view(torch.uint8).int() - b.view(torch.uint8).int()).abs()


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("k", [64, 4096])
def test_norm_quant_matches_the_norm_then_quantization(with_residual, k):
    """rms_norm_quant_fp8 against layernorm's add + RMSNorm and CUDA's quantize_rowwise of its bf16 output. The sum
    of squares is reduced in another order than torch's, which may move a normalised value by one bf16 step and
    so, rarely, a code by one; the residual sum is elementwise and exact."""
    from mixquant.kernels.quant import rms_norm_quant_fp8
    from mixquant.layers.layernorm import add_rms_norm, rms_norm

    g = torch.Generator().manual_seed(k)
    x = (torch.randn(33, k, generator=g) * torch.logspace(-3, 3, 33).unsqueeze(1)).to(torch.bfloat16)
    residual = torch.randn(33, k, generator=g).to(torch.bfloat16) if with_residual else None
    weight = (1 + 0.1 * torch.randn(k, generator=g)).to(torch.bfloat16)
    q, scale, summed = rms_norm_quant_fp8(x, weight, 1e-6, residual)
    if with_residual:
        normed, summed_ref = add_rms_norm(x, residual, weight, 1e-6)
        assert torch.equal(summed, summed_ref)
    else:
        normed = rms_norm(x, weight, 1e-6)
        assert summed is None
    q_ref, scale_ref = cuda_quantize_rowwise(normed)
    assert q.shape == (33, k) and scale.shape == (33, 1)
    assert ((scale - scale_ref).abs() <= scale_ref * 2 ** -7).all()  # at most one bf16 step of the row's amax
    apart = fp8_codes_apart(q, q_ref)
    assert apart.max() <= 1 and (apart == 0).float().mean() >= 0.99


def test_norm_quant_names_bad_inputs():
    from mixquant.kernels.quant import rms_norm_quant_fp8

    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_quant_fp8(x, torch.ones(64), 1e-6)  # float32 weight: the product would not round to bf16
    with pytest.raises(ValueError, match="residual"):
        rms_norm_quant_fp8(x, torch.ones(64, dtype=torch.bfloat16), 1e-6, torch.zeros(2, 32, dtype=torch.bfloat16))
