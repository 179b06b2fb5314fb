"""`mixquant bench prefill|decode` end to end on the CPU with a tiny model: rows, ratios, JSON and plot."""
from __future__ import annotations

import json

from mixquant.bench.shapes import SHAPES, linear_params, prefill_flops, shape_dir
from mixquant.cli import main


def test_prefill_and_decode_commands(tiny_qwen3, tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "prefill", "--model", str(tiny_qwen3), "--pairs", "bf16/bf16,fp8/bf16", "--contexts",
                 "32,64", "--repeats", "1", "--output-dir", str(out)]) == 0
    assert main(["bench", "decode", "--model", str(tiny_qwen3), "--pairs", "bf16/bf16,nvfp4/nvfp4", "--batches",
                 "1,3", "--context", "16", "--steps", "2", "--output-dir", str(out)]) == 0
    prefill = json.loads((out / "prefill.json").read_text())["rows"]
    decode = json.loads((out / "decode.json").read_text())["rows"]
    assert [(r["prefill_precision"], r["context"]) for r in prefill] == [("bf16", 32), ("bf16", 64), ("fp8", 32),
                                                                          ("fp8", 64)]
    assert all(r["tokens_per_s"] > 0 and r["tflops"] > 0 for r in prefill)
    assert [r["ratio_to_baseline"] for r in prefill if r["prefill_precision"] == "bf16"] == [1.0, 1.0]
    assert {(r["decode_precision"], r["batch"]) for r in decode} == {("bf16", 1), ("bf16", 3), ("nvfp4", 1),
                                                                     ("nvfp4", 3)}
    assert all(r["gbps"] > 0 and r["notes"]["kv_cache_tokens"] > 0 for r in decode)
    assert (out / "prefill.png").stat().st_size > 0 and (out / "decode.png").stat().st_size > 0


def test_flop_count_of_the_qwen3_8b_shape():
    from transformers import Qwen3Config

    config = Qwen3Config(**{k: v for k, v in SHAPES["qwen3-8b"].items() if k not in ("architectures", "model_type")})
    # 36 layers of q/k/v/o (4096x6144 + 4096x4096) and MLP (3 x 4096x12288): 6.95e9 weights, as the paper's model
    assert linear_params(config) == 36 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 12288)
    tokens = 8192
    attention = 4 * 32 * 128 * tokens * (tokens + 1) / 2 * 36
    assert prefill_flops(config, tokens) == 2 * linear_params(config) * tokens + 2 * 4096 * 151936 + attention


def test_rows_with_fp8_attention_compare_to_bf16_attention():
    from mixquant.bench.offline import Row, _set_ratios

    rows = [Row("prefill", "mixquant", "bf16", "bf16", 4096, 1, 100.0, 1.0),
            Row("prefill", "mixquant", "bf16", "bf16", 4096, 1, 150.0, 1.0, prefill_attention="fp8"),
            Row("prefill", "mixquant", "fp8", "bf16", 4096, 1, 200.0, 1.0, prefill_attention="fp8")]
    _set_ratios(rows, "prefill")
    assert [r.label for r in rows] == ["bf16/bf16", "bf16/bf16 fp8-attn", "fp8/bf16 fp8-attn"]
    assert [r.ratio_to_baseline for r in rows] == [1.0, 1.5, 2.0]


def test_unknown_prefill_attention_is_named(tiny_qwen3, capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["bench", "prefill", "--model", str(tiny_qwen3), "--prefill-attention", "bf16,fp16"])
    assert "'bf16,fp16': each prefill attention must be one of auto, bf16, fp8, fp8-cudnn" in capsys.readouterr().err


def test_active_parameters_of_the_qwen3_30b_a3b_shape():
    from transformers import Qwen3MoeConfig

    shape = {k: v for k, v in SHAPES["qwen3-30b-a3b"].items() if k not in ("architectures", "model_type")}
    config = Qwen3MoeConfig(**shape)
    attention = 2048 * (32 + 8) * 128 + 32 * 128 * 2048
    experts = 2048 * 128 + 8 * 3 * 2048 * 768  # router, and the 8 routed experts' gate/up/down
    assert linear_params(config) == 48 * (attention + experts)
    assert 2.9e9 < linear_params(config) + 2 * 151936 * 2048 < 3.4e9  # "A3B": ~3.3B active with embeddings and head


def test_decode_bytes_and_memory_of_a_moe_model(tiny_qwen3_moe, tmp_path):
    from mixquant.bench.offline import _decode_weight_bytes, _engine, _method_tensors, weight_bytes

    bf16 = _engine(str(tiny_qwen3_moe), "bf16/bf16", 64, 64, 4, None, eager=True)
    fp8 = _engine(str(tiny_qwen3_moe), "fp8/bf16", 64, 64, 4, None, eager=True)
    experts = bf16.runner.model.model.layers[0].mlp.experts
    all_experts = sum(t.numel() * t.element_size() for t in _method_tensors(experts.decode_method))
    one, many = _decode_weight_bytes(bf16, 1), _decode_weight_bytes(bf16, 1000)
    assert many - one == all_experts - 2 * all_experts // 8  # batch 1 reads 2 of 8 experts, a large batch all
    # fp8/bf16 holds the BF16 weights and an FP8 copy of every quantized layer, experts included
    fp8_experts = fp8.runner.model.model.layers[0].mlp.experts.prefill_method
    assert weight_bytes(fp8) - weight_bytes(bf16) > sum(t.numel() for t in (fp8_experts.q13, fp8_experts.q2))


def test_weights_and_attention_of_the_gemma4_shapes():
    """Per-layer geometry: 31B's 50 sliding layers (q/k/v, 16 KV heads of 256) and 10 full ones (q/k only, 4 of 512),
    about 29B weights a token multiplies by (31B with the embeddings); 26B-A4B's dense MLP beside the router and 8 of
    128 experts, about 3.1B (A4B with embeddings). Sliding layers attend to at most 1,024 keys."""
    from mixquant.utils.hf import load_config

    config = load_config(shape_dir("gemma4-31b"))
    h, heads, mlp = 5376, 32, 3 * 5376 * 21504
    sliding = h * (heads + 2 * 16) * 256 + heads * 256 * h + mlp
    full = h * (heads + 4) * 512 + heads * 512 * h + mlp
    assert linear_params(config) == 50 * sliding + 10 * full
    assert 30e9 < linear_params(config) + 262144 * h < 32e9
    tokens = 4096
    windowed = 1024 * 1025 / 2 + (tokens - 1024) * 1024
    attention = 4 * heads * (50 * 256 * windowed + 10 * 512 * tokens * (tokens + 1) / 2)
    assert prefill_flops(config, tokens) == 2 * linear_params(config) * tokens + 2 * h * 262144 + attention

    config = load_config(shape_dir("gemma4-26b-a4b"))
    h, heads = 2816, 16
    moe = 3 * h * 2112 + h * 128 + 8 * 3 * h * 704
    sliding = h * (heads + 2 * 8) * 256 + heads * 256 * h + moe
    full = h * (heads + 2) * 512 + heads * 512 * h + moe
    assert linear_params(config) == 25 * sliding + 5 * full
    assert 3.5e9 < linear_params(config) + 262144 * h < 4.5e9


def test_structured_command(tiny_qwen3, tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "structured", "--model", str(tiny_qwen3), "--pairs", "bf16/bf16", "--batch", "4",
                 "--fractions", "0,0.5,1", "--context", "16", "--steps", "2", "--output-dir", str(out)]) == 0
    rows = json.loads((out / "structured.json").read_text())["rows"]
    assert [r["notes"]["constrained_rows"] for r in rows] == [0, 2, 4]
    assert all(r["tokens_per_s"] > 0 and r["batch"] == 4 for r in rows)
    assert rows[0]["notes"]["mask_fill_ms"] == 0 and all(r["notes"]["mask_fill_us_per_row"] > 0 for r in rows[1:])
    assert [r["notes"]["unconstrained_row_loss"] is not None for r in rows] == [False, True, False]
