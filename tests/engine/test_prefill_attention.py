"""EngineConfig.prefill_attention reaches attention through the forward context, and only prefill segments see it.

The FP8 kernel itself runs only on CUDA (tests/kernels checks it under the interpreter, gpu_tests on the GPU);
on the CPU the flag must leave every segment on SDPA, with unchanged results.
"""
from __future__ import annotations

import pytest
import torch

from mixquant.config import AUTO_FP8_ATTENTION_MIN_TOKENS
from mixquant.layers.attention import TorchAttentionBackend
from mixquant.utils.context import AttentionSegment, ForwardContext


def step(prefill_attention: str, min_tokens: int = 0):
    """Rows [prefill of a fresh sequence (5) | decode token of a cached one (1) | decode token at position 0 (1)]."""
    table = torch.arange(4)
    segments = [AttentionSegment(0, 5, 0, table), AttentionSegment(5, 6, 9, table), AttentionSegment(6, 7, 0, table)]
    return ForwardContext(num_prefill_rows=5, slot_mapping=torch.zeros(7, dtype=torch.long), segments=segments,
                          prefill_attention=prefill_attention, fp8_attention_min_tokens=min_tokens)


@pytest.mark.parametrize("prefill_attention,min_tokens,expected", [("bf16", 0, ["bf16", "bf16", "bf16"]),
                                                                   ("fp8", 0, ["fp8", "bf16", "bf16"]),
                                                                   ("fp8-cudnn", 0, ["fp8-cudnn", "bf16", "bf16"]),
                                                                   ("fp8-cudnn", 5, ["fp8-cudnn", "bf16", "bf16"]),
                                                                   ("fp8-cudnn", 6, ["bf16", "bf16", "bf16"])])
def test_only_prefill_segments_are_offered_the_fp8_path(monkeypatch, prefill_attention, min_tokens, expected):
    offered = []

    def record(q, k, v, k_cache, v_cache, seg, scale, attention="bf16", window=None):
        offered.append(attention)
        return q[seg.row_start:seg.row_end]

    monkeypatch.setattr(TorchAttentionBackend, "_segment", staticmethod(record))
    q = torch.randn(7, 4, 16)
    TorchAttentionBackend().forward(q, q[:, :2], q[:, :2], None, None, step(prefill_attention, min_tokens), 0.25)
    assert offered == expected


@pytest.mark.parametrize("prefill_precision,asked,cudnn_runs,resolved,min_tokens", [
    ("fp8", "auto", True, "fp8-cudnn", AUTO_FP8_ATTENTION_MIN_TOKENS),
    ("fp8", "auto", False, "bf16", 0),  # no cuDNN frontend, or a GPU older than Hopper
    ("bf16", "auto", True, "bf16", 0),  # the BF16 baseline keeps BF16 attention
    ("nvfp4", "auto", True, "bf16", 0),  # NVFP4 studies keep the attention the paper's pipeline has
    ("fp8", "fp8-cudnn", True, "fp8-cudnn", 0),  # asked for by name: every fresh prefill segment
])
def test_auto_prefill_attention_is_cudnn_fp8_for_long_fp8_prefills_only(tiny_qwen3, monkeypatch, prefill_precision,
                                                                         asked, cudnn_runs, resolved, min_tokens):
    from mixquant import config

    monkeypatch.setattr(config, "fp8_cudnn_unavailable_reason", lambda device: None if cudnn_runs else "no cuDNN")
    engine_config = config.EngineConfig(model=str(tiny_qwen3), device="cpu", prefill_precision=prefill_precision,
                                        prefill_attention=asked)
    assert (engine_config.prefill_attention, engine_config.fp8_attention_min_tokens) == (resolved, min_tokens)


@pytest.mark.parametrize("prefill_attention", ["fp8", "fp8-cudnn"])
def test_on_the_cpu_the_fp8_flag_changes_nothing(prefill_attention):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(7, heads, 16, generator=g) for heads in (4, 2, 2))
    k_cache = torch.randn(4, 4, 2, 16, generator=g)  # [blocks, block_size, kv_heads, dim]: positions 0..15
    v_cache = torch.randn(4, 4, 2, 16, generator=g)
    backend = TorchAttentionBackend()
    assert torch.equal(backend.forward(q, k, v, k_cache, v_cache, step(prefill_attention), 0.25),
                       backend.forward(q, k, v, k_cache, v_cache, step("bf16"), 0.25))


@pytest.mark.parametrize("prefill_precision,capability,model_fits,says", [
    ("fp8", (9, 0), True, True),  # Hopper without the cuDNN frontend: the start line says what is missing and its cost
    ("fp8", (8, 9), True, False),  # cuDNN's FP8 attention needs Hopper: nothing to install that would help
    ("bf16", (9, 0), True, False),  # the BF16 baseline attends in BF16 anyway
    ("fp8", (9, 0), False, False),  # a model the FP8 kernels do not take (Gemma 4's windows): no package would help
])
def test_the_start_line_says_when_auto_leaves_fp8_attention_off_for_a_missing_package(
        tiny_qwen3, monkeypatch, prefill_precision, capability, model_fits, says):
    from types import SimpleNamespace

    from mixquant import config
    from mixquant.server.cli import startup_line

    monkeypatch.setattr(config, "compute_capability", lambda device: capability)
    monkeypatch.setattr(config, "fp8_cudnn_unavailable_reason",
                        lambda device: "the cuDNN frontend is not installed (pip install 'mixquant[cudnn]')")
    engine_config = config.EngineConfig(model=str(tiny_qwen3), device="cpu", prefill_precision=prefill_precision)
    assert engine_config.prefill_attention == "bf16"
    if not model_fits:  # what the runner calls for such a model (ModelRunner._check_fp8_prefill_attention)
        engine_config.fp8_attention_unsupported("it needs head_dim in (64, 128) and no sliding window")
    engine = SimpleNamespace(config=engine_config, kv_cache_tokens=lambda: 4096, max_model_len=4096, kv_connector=None)
    line = startup_line(engine, SimpleNamespace(served_model_names=["tiny"], model_path="tiny"), "127.0.0.1", 8000)
    assert ("FP8 attention is off because the cuDNN frontend is not installed (pip install 'mixquant[cudnn]')"
            in line) == says
    assert ("1.54x with it" in line) == says
