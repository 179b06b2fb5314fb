"""utils.compile.fused_on_gpu, compiled for real on the CPU: past dynamo's variant limit the eager function answers."""
from __future__ import annotations

import torch
import torch._dynamo

from mixquant.layers import layernorm
from mixquant.utils import compile as fused


def test_shapes_past_the_compile_variant_limit_run_unfused_with_the_same_values(monkeypatch):
    monkeypatch.setattr(fused, "FUSED_DEVICE_TYPES", ("cpu",))
    torch._dynamo.reset()
    norm = fused.fused_on_gpu(layernorm.rms_norm_fp32.__wrapped__)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 32, generator=g).bfloat16()
    weight = torch.randn(32, generator=g).bfloat16()
    # Gemma 4's variants: per-head rows with a weight, weight-free rows, hidden rows of another width
    calls = [(x, weight), (x, None), (x.flatten(1), torch.randn(128, generator=g).bfloat16())]
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            for rows, w in calls:
                assert torch.equal(norm(rows, w, 1e-6), layernorm.rms_norm_fp32.__wrapped__(rows, w, 1e-6))
    finally:
        torch._dynamo.reset()

