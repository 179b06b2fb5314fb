"""The kernels compile for Hopper (sm_90) without a GPU, with the instructions their design relies on.

The interpreter runs the kernels' logic but not the compiler: this catches what only compilation can (tl.dot shape
rules, loop-carried types), register spills, and changes that would break bit-identity with torch (an
approximate division, a different rounding of the FP8 cast). Runs in the main test process, where the kernels are
compiled rather than interpreted (conftest.py).
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mixquant.kernels.fp8_attention import _LOG2_FP8_MAX, PrefillConfig, _fp8_prefill_kernel, _quantize_blocks_kernel
from mixquant.kernels.paged_attention import DecodeConfig, _decode_split_kernel, _merge_kernel
from mixquant.kernels.prefill_attention import PagedPrefillConfig, _paged_prefill_kernel
from mixquant.kernels.quant import _per_token_quant_kernel, _rms_norm_quant_kernel
from mixquant.kernels.rotary import _norm_rope_kernel
from mixquant.quantization.fp8 import _ZERO_ROW_SCALE, FP8_MAX

HOPPER = GPUTarget("cuda", 90, 32)


def compile_for_hopper(kernel, types: dict[str, str], constexprs: dict, num_warps: int = 4, num_stages: int = 2,
                       target: GPUTarget = HOPPER, fp_fusion: bool = True):
    """(ptx, sass instruction counts, resource usage) of kernel built for sm_90 (or `target`); unlisted parameters
    are i32.

    Pointers and int parameters are marked 16-divisible, as Triton specializes them at a real launch.
    """
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    aligned = [n for n in names if n not in constexprs and (signature[n].startswith("*") or n.startswith("stride"))]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs), target=target,
                              options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=fp_fusion))

    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()

        def cuobjdump(flag: str) -> str:
            return subprocess.run([triton.knobs.nvidia.cuobjdump.path, flag, cubin.name], capture_output=True,
                                  text=True, check=True).stdout

        # opcode with its modifiers, shapes included (QGMMA.64x64x32.F32.E4M3.E4M3)
        sass = Counter(re.findall(r"\b([A-Z][A-Z0-9]+(?:\.[A-Z0-9_]+(?:x[0-9]+)*)*)\s", cuobjdump("-sass")))
        return compiled.asm["ptx"], sass, cuobjdump("-res-usage")


ATTENTION_TYPES = dict(q_ptr="*bf16", k_cache_ptr="*bf16", v_cache_ptr="*bf16", block_tables_ptr="*i32",
                       context_lens_ptr="*i32", out_ptr="*bf16", part_out_ptr="*fp32", part_lse_ptr="*fp32",
                       qk_scale="fp32")
ATTENTION_CONSTEXPRS = dict(NUM_HEADS=32, GROUP=4, GROUP_PAD=16, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_N=64,
                            DIRECT=False, DOT_PRECISION="tf32")


@pytest.mark.parametrize("variant", ["qwen3_8b_bf16", "one_split_mha_fp32", "gqa8_int64_tables"])
def test_decode_split_kernel_builds_on_tensor_cores_without_spills(variant):
    types, constexprs = dict(ATTENTION_TYPES), dict(ATTENTION_CONSTEXPRS)
    if variant == "one_split_mha_fp32":
        types.update(q_ptr="*fp32", k_cache_ptr="*fp32", v_cache_ptr="*fp32", out_ptr="*fp32")
        constexprs.update(GROUP=1, HEAD_DIM=64, DIRECT=True, DOT_PRECISION="ieee", part_out_ptr=None,
                          part_lse_ptr=None)
    elif variant == "gqa8_int64_tables":
        types.update(block_tables_ptr="*i64", context_lens_ptr="*i64")
        constexprs.update(GROUP=8)
    _, sass, usage = compile_for_hopper(_decode_split_kernel, types, constexprs)
    assert "LOCAL:0" in usage and "STACK:0" in usage, usage
    if variant == "qwen3_8b_bf16":
        assert sass["HMMA.16816.F32.BF16"] > 0, "the two dots should run on the tensor cores"
        assert sass["LDGSTS.E.BYPASS.128"] > 0, "K/V tiles should stream in as 16-byte async copies"


@pytest.mark.parametrize("head_dim,group", [(256, 2), (512, 8)], ids=["gemma4_31b_sliding", "gemma4_31b_full"])
def test_decode_split_kernel_builds_for_gemma4_heads_without_spills(head_dim, group):
    """Gemma 4 31B's two geometries (32 query heads over 16 KV heads of 256, over 4 of 512), with the tiles
    DecodeConfig picks for them, a sliding window or not (a runtime argument)."""
    config = DecodeConfig.for_head_dim(head_dim)
    constexprs = dict(ATTENTION_CONSTEXPRS, GROUP=group, HEAD_DIM=head_dim, BLOCK_N=config.block_n)
    _, sass, usage = compile_for_hopper(_decode_split_kernel, ATTENTION_TYPES, constexprs,
                                        num_warps=config.num_warps, num_stages=config.num_stages)
    assert "LOCAL:0" in usage and "STACK:0" in usage, usage
    assert sass["HMMA.16816.F32.BF16"] > 0, "the two dots should run on the tensor cores"


@pytest.mark.parametrize("head_dim,group", [(128, 4), (256, 2), (512, 8)],
                         ids=["d128", "gemma4_31b_sliding", "gemma4_31b_full"])
def test_paged_prefill_kernel_builds_on_tensor_cores_without_spills(head_dim, group):
    """The Triton prefill attention of windows and wide heads, with the tiles PagedPrefillConfig picks."""
    config = PagedPrefillConfig.for_head_dim(head_dim)
    _, sass, usage = compile_for_hopper(
        _paged_prefill_kernel, dict(q_ptr="*bf16", k_cache_ptr="*bf16", v_cache_ptr="*bf16", table_ptr="*i64",
                                    out_ptr="*bf16", qk_scale="fp32"),
        dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=16, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
             DOT_PRECISION="tf32"), num_warps=config.num_warps, num_stages=config.num_stages)
    assert "LOCAL:0" in usage and "STACK:0" in usage, usage
    assert any(op.startswith(("HMMA", "HGMMA")) for op in sass), "the two dots should run on the tensor cores"


def test_merge_kernel_builds():
    _, _, usage = compile_for_hopper(
        _merge_kernel, dict(out_ptr="*bf16", part_out_ptr="*fp32", part_lse_ptr="*fp32", context_lens_ptr="*i32"),
        dict(NUM_HEADS=32, HEAD_DIM=128, SPLITS_PAD=64, BLOCK_N=64), num_warps=2)
    assert "LOCAL:0" in usage, usage


@pytest.mark.parametrize("dtype,block_k,whole_row", [("bf16", 4096, True), ("bf16", 16384, True),
                                                     ("fp32", 4096, False)])
def test_quant_kernel_builds_with_torch_cuda_arithmetic(dtype, block_k, whole_row):
    ptx, _, usage = compile_for_hopper(
        _per_token_quant_kernel, dict(x_ptr=f"*{dtype}", q_ptr="*fp8e4nv", scale_ptr="*fp32"),
        dict(BLOCK_K=block_k, WHOLE_ROW=whole_row, ACTIVATION=0, FP8_MAX=448.0, ZERO_ROW_SCALE=_ZERO_ROW_SCALE),
        num_warps=8 if block_k >= 8192 else 4)
    assert "LOCAL:0" in usage, usage
    assert "div.rn.f32" in ptx and "div.full.f32" not in ptx and "div.approx" not in ptx
    assert re.search(r"mul(\.rn)?\.f32\s+%r\d+, %r\d+, 0f3B124925;", ptx), "scale = amax * float32(1/448)"
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx


@pytest.mark.parametrize("activation", [1, 2], ids=["silu", "gelu_tanh"])
@pytest.mark.parametrize("block_k,whole_row", [(16384, True), (4096, False)])
def test_gated_quant_kernel_builds_without_spills(block_k, whole_row, activation):
    """The down projection's input (Qwen3-8B: 12,288 of gate and of up a row) held in registers, not spilled."""
    ptx, _, usage = compile_for_hopper(
        _per_token_quant_kernel, dict(x_ptr="*bf16", q_ptr="*fp8e4nv", scale_ptr="*fp32"),
        dict(BLOCK_K=block_k, WHOLE_ROW=whole_row, ACTIVATION=activation, FP8_MAX=448.0,
             ZERO_ROW_SCALE=_ZERO_ROW_SCALE),
        num_warps=16 if block_k >= 8192 else 8)
    assert "LOCAL:0" in usage, usage
    assert "div.rn.f32" in ptx  # the quantizing division stays IEEE
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx


@pytest.mark.parametrize("residual", [True, False])
def test_norm_quant_kernel_builds_with_torch_cuda_arithmetic(residual):
    """The norm before Qwen3-8B's QKV / gate-up projections (4,096 a row): IEEE division for the mean and the
    quantization, the scale as CUDA's quantize_rowwise computes it, no spills."""
    ptx, _, usage = compile_for_hopper(
        _rms_norm_quant_kernel, dict(x_ptr="*bf16", residual_ptr="*bf16", weight_ptr="*bf16", summed_ptr="*bf16",
                                     q_ptr="*fp8e4nv", scale_ptr="*fp32", eps="fp32"),
        dict(BLOCK_K=4096, HAS_RESIDUAL=residual, FP8_MAX=448.0, ZERO_ROW_SCALE=_ZERO_ROW_SCALE), fp_fusion=False)
    assert "LOCAL:0" in usage, usage
    assert "div.rn.f32" in ptx and "div.full.f32" not in ptx and "div.approx" not in ptx
    assert re.search(r"mul(\.rn)?\.f32\s+%r\d+, %r\d+, 0f3B124925;", ptx), "scale = amax * float32(1/448)"
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx


@pytest.mark.parametrize("heads,norm", [(32, True), (8, True), (6, False)])
def test_norm_rope_kernel_builds_without_spills(heads, norm):
    """Qwen3-8B's q and k (32 and 8 heads of 128) and a model without QK-norm; 16-byte loads of the halves; as
    launched (FP fusion off), no FMA joins a rounded product to the sum after it."""
    ptx, sass, usage = compile_for_hopper(
        _norm_rope_kernel, dict(x_ptr="*bf16", weight_ptr="*bf16", out_ptr="*bf16", cos_ptr="*fp32",
                                sin_ptr="*fp32", positions_ptr="*i64", eps="fp32"),
        dict(HEADS=heads, HEADS_POW2=triton.next_power_of_2(heads), HALF=64, NORM=norm), fp_fusion=False)
    assert "LOCAL:0" in usage, usage
    assert any(op.startswith("LDG.E.128") for op in sass), sorted(sass)
    assert "fma" not in ptx


FP8_ATTENTION_TYPES = dict(q_ptr="*bf16", k8_ptr="*fp8e4nv", vt8_ptr="*fp8e4nv", k_scale_ptr="*fp32",
                           v_scale_ptr="*fp32", out_ptr="*bf16", sm_scale_log2="fp32")


@pytest.mark.parametrize("head_dim,group,config", [(128, 4, PrefillConfig()), (64, 1, PrefillConfig()),
                                                   (128, 4, PrefillConfig(block_n=128))],
                         ids=["qwen3_8b_default", "d64_mha_default", "d128_tiles_128x128"])
def test_fp8_prefill_kernel_runs_both_products_on_fp8_wgmma_without_spills(head_dim, group, config):
    ptx, sass, usage = compile_for_hopper(
        _fp8_prefill_kernel, FP8_ATTENTION_TYPES,
        dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n, FP8_MAX=FP8_MAX,
             ZERO_ROW_SCALE=_ZERO_ROW_SCALE, LOG2_FP8_MAX=_LOG2_FP8_MAX),
        num_warps=config.num_warps, num_stages=config.num_stages)
    assert "LOCAL:0" in usage and "STACK:0" in usage, usage
    # Triton emits FP8 tl.dot on sm_90 as warpgroup MMA: wgmma ... e4m3.e4m3 in PTX, QGMMA in SASS (A from
    # registers, B from shared memory); Q K^T is [64 rows x BLOCK_N] per warpgroup, each P V half [64 x D/2]
    assert f"wgmma.mma_async.sync.aligned.m64n{config.block_n}k32.f32.e4m3.e4m3" in ptx
    assert f"wgmma.mma_async.sync.aligned.m64n{head_dim // 2}k32.f32.e4m3.e4m3" in ptx
    assert sass[f"QGMMA.64x{config.block_n}x32.F32.E4M3.E4M3"] > 0, "Q K^T on FP8 tensor cores"
    assert sass[f"QGMMA.64x{head_dim // 2}x32.F32.E4M3.E4M3"] > 0, "P V on FP8 tensor cores"
    assert not [op for op in sass if op.startswith(("HGMMA", "HMMA"))], "no product falls back to 16-bit MMA"
    assert sass["LDGSTS.E.BYPASS.128"] > 0, "K/V tiles should stream in as 16-byte async copies"
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx, "Q and P cast to e4m3 with round-to-nearest-even"


def test_fp8_prefill_kernel_builds_for_ada_on_fp8_mma():
    """EngineConfig allows prefill_attention="fp8" from sm_89: there the products are warp-level FP8 MMA."""
    config = PrefillConfig()
    _, sass, usage = compile_for_hopper(
        _fp8_prefill_kernel, FP8_ATTENTION_TYPES,
        dict(GROUP=4, HEAD_DIM=128, BLOCK_M=config.block_m, BLOCK_N=config.block_n, FP8_MAX=FP8_MAX,
             ZERO_ROW_SCALE=_ZERO_ROW_SCALE, LOG2_FP8_MAX=_LOG2_FP8_MAX),
        num_warps=config.num_warps, num_stages=config.num_stages, target=GPUTarget("cuda", 89, 32))
    assert "LOCAL:0" in usage, usage
    assert sass["QMMA.16832.F32.E4M3.E4M3"] > 0


@pytest.mark.parametrize("transpose", [False, True], ids=["k_rows", "v_transposed"])
def test_quantize_blocks_kernel_builds_with_torch_cuda_arithmetic(transpose):
    # a launch specializes the unit stride to a constant, as here
    unit = dict(stride_ot=1) if transpose else dict(stride_od=1)
    ptx, _, usage = compile_for_hopper(
        _quantize_blocks_kernel, dict(x_ptr="*bf16", out_ptr="*fp8e4nv", scale_ptr="*fp32"),
        dict(BLOCK=64, HEAD_DIM=128, FP8_MAX=FP8_MAX, ZERO_ROW_SCALE=_ZERO_ROW_SCALE, **unit), num_warps=8)
    assert "LOCAL:0" in usage, usage
    assert "div.rn.f32" in ptx and "div.full.f32" not in ptx and "div.approx" not in ptx
    assert re.search(r"mul(\.rn)?\.f32\s+%r\d+, %r\d+, 0f3B124925;", ptx), "scale = amax * float32(1/448)"
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx


class _Launches:
    """Stands in for a Triton kernel: records each launch's arguments instead of running it."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def test_decode_kernels_compile_once_for_every_batch_shape(monkeypatch):
    """Triton compiles a kernel again for each new specialization of its arguments. Table widths and split counts
    follow the batch: were the kernels specialized on them, an eager decode tail beside a prefill would compile in
    the middle of serving (widths the start-up graphs never saw)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from mixquant.kernels import paged_attention

    backend = make_backend(HOPPER)
    launches = {name: _Launches() for name in ("_decode_split_kernel", "_merge_kernel")}
    kernels = {name: getattr(paged_attention, name) for name in launches}
    for name, recorder in launches.items():
        monkeypatch.setattr(paged_attention, name, recorder)
    cache = torch.zeros(400, 16, 8, 128, dtype=torch.bfloat16)
    for batch, width, splits in ((1, 1, 64), (1, 320, 64), (1, 321, 3), (3, 437, 17), (8, 2560, 2)):
        q = torch.zeros(batch, 32, 128, dtype=torch.bfloat16)
        tables = torch.zeros(batch, width, dtype=torch.int32)
        paged_attention.paged_decode_attention(q, cache, cache, tables, torch.ones(batch, dtype=torch.int32), 0.1,
                                               num_splits=splits)
    for name, recorder in launches.items():
        binder = create_function_from_signature(kernels[name].signature, kernels[name].params, backend)
        keys = {str(binder(*args, **{k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")},
                           debug=False)[1]) for args, kwargs in recorder.calls}
        assert len(recorder.calls) == 5 and len(keys) == 1, (name, keys)


GROUPED_GEMM_TYPES = dict(a_ptr="*bf16", b_ptr="*bf16", c_ptr="*bf16", a_scale_ptr="*fp32", b_scale_ptr="*fp32",
                          weight_ptr="*fp32", sorted_ids_ptr="*i32", block_experts_ptr="*i32", num_padded_ptr="*i32")


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("block_m", [16, 64], ids=["decode_tiles", "prefill_tiles"])
def test_grouped_expert_gemm_builds_on_tensor_cores_without_spills(fp8, block_m):
    from mixquant.kernels.fused_moe import _grouped_gemm_kernel

    types = dict(GROUPED_GEMM_TYPES, **(dict(a_ptr="*fp8e4nv", b_ptr="*fp8e4nv") if fp8 else {}))
    constexprs = dict(FP8=fp8, MUL_WEIGHT=True, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=128 if fp8 else 64)
    _, sass, usage = compile_for_hopper(_grouped_gemm_kernel, types, constexprs, num_stages=3)
    assert "LOCAL:0" in usage and "STACK:0" in usage, usage
    if block_m == 64:  # a warpgroup's tile: wgmma, FP8 operands multiplied as FP8
        assert sass["QGMMA.64x64x32.F32.E4M3.E4M3" if fp8 else "HGMMA.64x64x16.F32.BF16"] > 0, sass
    else:  # 16-row tiles (a few copies per expert) run mma.sync
        assert sum(n for op, n in sass.items() if op.startswith("HMMA.16816.F32")) > 0, sass
