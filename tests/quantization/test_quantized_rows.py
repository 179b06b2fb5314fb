"""fp8.QuantizedRows: an activation its producer quantized (the norm before a projection) reaches the FP8 GEMM as
is, and a layer asks for it only when one native FP8 method computes all of the step's rows."""
from __future__ import annotations

import pytest
import torch

from mixquant.layers.linear import Linear
from mixquant.quantization import fp8
from mixquant.quantization.linear_methods import BF16Method, FP8Method
from mixquant.utils.context import ForwardContext, forward_context


def fp8_layer(native: bool) -> Linear:
    layer = Linear(64, [32], False, "model.layers.0.mlp.down_proj")
    layer.weight.data = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) * 0.1
    low = FP8Method.from_weight(layer.weight.data, None, native=native)
    layer.set_methods(low, BF16Method(layer.weight.data, None))
    return layer


def test_quantized_rows_give_what_quantizing_x_gives():
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    method = FP8Method.from_weight(torch.randn(32, 64, generator=torch.Generator().manual_seed(0)), None,
                                   native=True)  # torch._scaled_mm also runs on the CPU
    emulated = FP8Method(method.qweight, method.weight_scale, None, native=False)
    rows = fp8.QuantizedRows(*fp8.quantize_rowwise(x), torch.float32)
    torch.testing.assert_close(method(rows), emulated(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefill_rows,rows,native,expected", [
    (5, 5, True, True),    # all rows prefill: the native FP8 method takes them
    (0, 5, True, False),   # all rows decode: BF16
    (3, 5, True, False),   # rows split between the phases: each method quantizes its own
    (5, 5, False, False),  # emulated FP8 quantizes with the reference arithmetic itself
])
def test_a_layer_takes_quantized_rows_only_from_one_native_fp8_method(prefill_rows, rows, native, expected):
    layer = fp8_layer(native)
    with forward_context(ForwardContext(num_prefill_rows=prefill_rows, slot_mapping=torch.zeros(rows,
                                                                                                 dtype=torch.long))):
        assert layer.takes_quantized_rows(rows) is expected


def test_rows_too_wide_for_the_fused_norm_come_unquantized():
    """Rows past what rms_norm_quant_fp8 holds in registers: the norm returns them in 16 bits and the FP8 layer
    quantizes them itself."""
    from mixquant.kernels.quant import NORM_QUANT_MAX_K
    from mixquant.layers.layernorm import RMSNorm

    norm = RMSNorm(NORM_QUANT_MAX_K + 16, 1e-6)
    x = torch.randn(3, NORM_QUANT_MAX_K + 16)
    out = norm(x, quantize=True)
    assert isinstance(out, torch.Tensor) and torch.equal(out, norm(x))
