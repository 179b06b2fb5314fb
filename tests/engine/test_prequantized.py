"""`mixquant quantize` writes compressed-tensors checkpoints; `prefill_model=` runs the prefill phase from one."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mixquant import LLM, SamplingParams
from mixquant.cli import main
from mixquant.quantization import compressed_tensors as ct
from mixquant.quantization import nvfp4
from mixquant.quantization.linear_methods import FP8Method, NVFP4Method

from .helpers import engine_prompt_logits


@pytest.fixture(scope="module")
def quantized(tiny_qwen3, tmp_path_factory):
    out = {}
    for scheme in ("nvfp4", "fp8"):
        path = tmp_path_factory.mktemp(f"tiny-{scheme}")
        assert main(["quantize", str(tiny_qwen3), str(path), "--scheme", scheme, "--device", "cpu"]) == 0
        out[scheme] = path
    return out


def test_quantized_checkpoint_layout(tiny_qwen3, quantized):
    original = load_file(tiny_qwen3 / "model.safetensors")
    for scheme, path in quantized.items():
        config = json.loads((path / "config.json").read_text())
        assert ct.parse_quantization_config(config["quantization_config"]).name == scheme
        tensors = load_file(path / "model.safetensors")
        for name, tensor in original.items():
            module = name.rpartition(".")[0]
            if ".layers." in name and module.endswith("_proj"):
                assert name not in tensors or scheme == "fp8"
                restored = ct.decompress_linear(tensors, module, scheme)
                err = (restored - tensor).abs().max() / tensor.abs().max()
                assert err < (0.2 if scheme == "nvfp4" else 0.07)
            else:
                assert torch.equal(tensors[name], tensor)  # embeddings, norms, lm_head untouched
        assert (path / "tokenizer.json").is_file()
        if scheme == "nvfp4":  # q/k/v share one weight global scale and one calibrated input scale
            layer = "model.layers.0.self_attn"
            scales = [tensors[f"{layer}.{p}.weight_global_scale"] for p in ("q_proj", "k_proj", "v_proj")]
            assert all(torch.equal(s, scales[0]) for s in scales)
            assert tensors[f"{layer}.q_proj.input_global_scale"].item() > 0


def test_prefill_model_weights_are_used_exactly(tiny_qwen3, quantized):
    llm = LLM(str(tiny_qwen3), prefill_model=str(quantized["nvfp4"]), dtype="float32", device="cpu")
    assert llm.engine.config.prefill_precision == "nvfp4"  # auto follows the checkpoint
    tensors = load_file(quantized["nvfp4"] / "model.safetensors")
    qkv = llm.engine.runner.model.model.layers[1].self_attn.qkv_proj
    method = qkv.prefill_method
    assert isinstance(method, NVFP4Method)
    prefix = "model.layers.1.self_attn"
    assert torch.equal(method.packed, torch.cat([tensors[f"{prefix}.{p}.weight_packed"] for p in ("q_proj", "k_proj",
                                                                                                    "v_proj")]))
    assert len(method.groups) == 1 and method.groups[0].input_global_scale is not None
    # the emulated GEMM equals a float64 reference built from the checkpoint bytes
    x = torch.randn(5, qkv.input_size)
    gs_x = method.groups[0].input_global_scale
    x_hat = nvfp4.dequantize(*nvfp4.quantize(x, gs_x), gs_x).double()
    w_hat = torch.cat([ct.decompress_linear(tensors, f"{prefix}.{p}", "nvfp4")
                       for p in ("q_proj", "k_proj", "v_proj")]).double()
    torch.testing.assert_close(method(x).double(), x_hat @ w_hat.t(), rtol=1e-5, atol=1e-5)
    assert qkv.decode_method.precision == "bf16"


def test_fp8_checkpoint_equals_quantizing_at_load(tiny_qwen3, quantized):
    from_checkpoint = LLM(str(tiny_qwen3), prefill_model=str(quantized["fp8"]), dtype="float32", device="cpu")
    at_load = LLM(str(tiny_qwen3), prefill_precision="fp8", dtype="float32", device="cpu")
    assert isinstance(from_checkpoint.engine.runner.model.model.layers[0].mlp.down_proj.prefill_method, FP8Method)
    ids = list(range(2000, 2040))
    torch.testing.assert_close(engine_prompt_logits(from_checkpoint.engine, ids),
                               engine_prompt_logits(at_load.engine, ids), rtol=0, atol=0)


def test_checkpoint_scheme_must_match_the_prefill_precision(tiny_qwen3, quantized):
    with pytest.raises(ValueError, match="holds nvfp4 weights but prefill_precision='fp8'"):
        LLM(str(tiny_qwen3), prefill_model=str(quantized["nvfp4"]), prefill_precision="fp8", device="cpu")
    with pytest.raises(ValueError, match="not a compressed-tensors"):
        LLM(str(tiny_qwen3), prefill_model=str(tiny_qwen3), device="cpu")


def test_generate_cli(tiny_qwen3, capsys):
    assert main(["generate", "--model", str(tiny_qwen3), "--prompt", "Hi", "--max-tokens", "3", "--device", "cpu",
                 "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_calibrated_checkpoint_generates(tiny_qwen3, quantized):
    llm = LLM(str(tiny_qwen3), prefill_model=str(quantized["nvfp4"]), decode_precision="nvfp4", dtype="float32",
              device="cpu")
    out = llm.generate("Hello", SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4
