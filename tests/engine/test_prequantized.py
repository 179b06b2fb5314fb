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


def quantize_both(model, tmp_path_factory) -> dict:
    """`mixquant quantize` of `model` to each scheme: scheme -> checkpoint folder."""
    out = {}
    for scheme in ("nvfp4", "fp8"):
        out[scheme] = tmp_path_factory.mktemp(f"{model.name}-{scheme}")
        assert main(["quantize", str(model), str(out[scheme]), "--scheme", scheme, "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="module")
def quantized(tiny_qwen3, tmp_path_factory):
    return quantize_both(tiny_qwen3, tmp_path_factory)


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


def test_down_proj_input_scale_is_calibrated_on_its_real_input(tiny_qwen3, quantized):
    """down_proj gets [gate | up] and gates it itself: its activation scale comes from silu(gate) * up."""
    from mixquant.layers.activation import silu_and_mul
    from mixquant.quantization.quantize import DEFAULT_CALIBRATION

    llm = LLM(str(tiny_qwen3), prefill_precision="bf16", dtype="float32", device="cpu", enable_prefix_caching=False)
    down = llm.engine.runner.model.model.layers[0].mlp.down_proj
    seen = []
    down.register_forward_pre_hook(lambda m, args, kwargs: seen.append(silu_and_mul(args[0]).abs().amax()),
                                   with_kwargs=True)
    llm.generate(DEFAULT_CALIBRATION, SamplingParams(max_tokens=1), use_tqdm=False)
    tensors = load_file(quantized["nvfp4"] / "model.safetensors")
    expected = nvfp4.global_scale_from_amax(torch.stack(seen).amax().float()).reshape(1)
    torch.testing.assert_close(tensors["model.layers.0.mlp.down_proj.input_global_scale"], expected)


@pytest.fixture(scope="module")
def quantized_moe(tiny_qwen3_moe, tmp_path_factory):
    return quantize_both(tiny_qwen3_moe, tmp_path_factory)


@pytest.mark.parametrize("scheme", ["nvfp4", "fp8"])
def test_moe_checkpoint_has_one_module_per_expert_and_a_bf16_router(tiny_qwen3_moe, quantized_moe, scheme):
    original = load_file(tiny_qwen3_moe / "model.safetensors")
    tensors = load_file(quantized_moe[scheme] / "model.safetensors")
    config = json.loads((quantized_moe[scheme] / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == ["lm_head", "re:.*mlp.gate$"]
    assert torch.equal(tensors["model.layers.0.mlp.gate.weight"], original["model.layers.0.mlp.gate.weight"])
    for e in range(8):
        for shard in ("gate_proj", "up_proj", "down_proj"):
            module = f"model.layers.0.mlp.experts.{e}.{shard}"
            restored = ct.decompress_linear(tensors, module, scheme)
            weight = original[f"{module}.weight"]
            assert (restored - weight).abs().max() / weight.abs().max() < (0.2 if scheme == "nvfp4" else 0.07)
            if scheme == "nvfp4":
                assert tensors[f"{module}.input_global_scale"].item() > 0
        if scheme == "nvfp4":  # an expert's gate and up share one weight global scale, as q/k/v do
            prefix = f"model.layers.0.mlp.experts.{e}"
            assert torch.equal(tensors[f"{prefix}.gate_proj.weight_global_scale"],
                               tensors[f"{prefix}.up_proj.weight_global_scale"])


def test_stacked_experts_are_written_per_expert(tiny_qwen3_moe, quantized_moe, tmp_path):
    from safetensors.torch import save_file

    from .helpers import hf_model

    stacked = tmp_path / "stacked"
    stacked.mkdir()
    for f in tiny_qwen3_moe.iterdir():
        if f.suffix != ".safetensors":
            (stacked / f.name).write_bytes(f.read_bytes())
    save_file({k: v.contiguous() for k, v in hf_model(tiny_qwen3_moe).state_dict().items()},
              str(stacked / "model.safetensors"))
    out = tmp_path / "out"
    assert main(["quantize", str(stacked), str(out), "--scheme", "fp8", "--device", "cpu"]) == 0
    ours, reference = load_file(out / "model.safetensors"), load_file(quantized_moe["fp8"] / "model.safetensors")
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


@pytest.mark.parametrize("scheme", ["nvfp4", "fp8"])
def test_moe_prefill_model_runs_the_checkpoints_experts(tiny_qwen3_moe, quantized_moe, scheme):
    from mixquant.quantization.expert_methods import BF16Experts, FP8Experts, NVFP4Experts

    llm = LLM(str(tiny_qwen3_moe), prefill_model=str(quantized_moe[scheme]), dtype="float32", device="cpu")
    experts = llm.engine.runner.model.model.layers[0].mlp.experts
    assert isinstance(experts.prefill_method, FP8Experts if scheme == "fp8" else NVFP4Experts)
    assert isinstance(experts.decode_method, BF16Experts)
    tensors = load_file(quantized_moe[scheme] / "model.safetensors")
    prefix = "model.layers.0.mlp.experts.3"
    if scheme == "fp8":
        assert torch.equal(experts.prefill_method.q2[3], tensors[f"{prefix}.down_proj.weight"])
    else:
        assert torch.equal(experts.prefill_method.down[3].packed, tensors[f"{prefix}.down_proj.weight_packed"])
    if scheme == "fp8":  # the same per-channel FP8 of the same weights as quantizing at load
        at_load = LLM(str(tiny_qwen3_moe), prefill_precision="fp8", dtype="float32", device="cpu")
        ids = llm.get_tokenizer()("experts read from a compressed-tensors checkpoint")["input_ids"]
        torch.testing.assert_close(engine_prompt_logits(llm.engine, ids), engine_prompt_logits(at_load.engine, ids),
                                   rtol=0, atol=0)
    out = llm.generate("The experts", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
