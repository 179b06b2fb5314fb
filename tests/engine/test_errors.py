"""Bad input gets a clear error that names the problem."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from mixquant import LLM, SamplingParams


def test_too_long_prompt_names_both_lengths(tiny_qwen3):
    llm = LLM(str(tiny_qwen3), dtype="float32", device="cpu", max_model_len=64)
    with pytest.raises(ValueError, match=r"70 tokens.*max_model_len=64"):
        llm.generate([list(range(100, 170))], SamplingParams(max_tokens=1), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate("still serving", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_bad_token_ids_and_empty_prompt(tiny_qwen3):
    llm = LLM(str(tiny_qwen3), dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[1, 2, 10**9]], use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], use_tqdm=False)


def test_max_model_len_beyond_the_model(tiny_qwen3):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LLM(str(tiny_qwen3), dtype="float32", device="cpu", max_model_len=10**6)


def test_unknown_architecture_lists_supported(tiny_qwen3, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_qwen3, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["MixtralForCausalLM"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported architecture.*Qwen3ForCausalLM.*LlamaForCausalLM"):
        LLM(str(bad), device="cpu")


def test_missing_files(tiny_qwen3, tmp_path):
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_qwen3, no_weights)
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        LLM(str(no_weights), device="cpu")
    with pytest.raises(ValueError, match="not a local folder"):
        LLM(str(tmp_path / "does-not-exist"), device="cpu")
    (no_weights / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        LLM(str(no_weights), device="cpu")


def test_missing_tensors_are_named(tiny_qwen3, tmp_path):
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(tiny_qwen3, partial)
    tensors = load_file(partial / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, partial / "model.safetensors")
    with pytest.raises(ValueError, match="gate_up_proj|lacks"):
        LLM(str(partial), device="cpu")


@pytest.mark.parametrize("kwargs,field", [(dict(prefill_precision="int4"), "prefill_precision"),
                                          (dict(decode_precision="fp4"), "decode_precision"),
                                          (dict(dtype="int8"), "dtype"), (dict(device="cuda"), "cuda")])
def test_bad_engine_options(tiny_qwen3, kwargs, field):
    with pytest.raises(ValueError, match=field):
        LLM(str(tiny_qwen3), **kwargs)


@pytest.mark.parametrize("value,message", [
    ("fp8", r"prefill_attention='fp8' needs a CUDA GPU of compute capability >= 8\.9.*device cpu has no CUDA device"),
    ("fp8-cudnn", r"prefill_attention='fp8-cudnn' cannot run: (the cuDNN frontend is not installed|it needs a CUDA GPU)"),
    ("fp16", r"prefill_attention='fp16' is not one of auto, bf16, fp8, fp8-cudnn")])
def test_prefill_attention_is_checked(tiny_qwen3, value, message):
    with pytest.raises(ValueError, match=message):
        LLM(str(tiny_qwen3), device="cpu", prefill_attention=value)


def test_prefill_attention_defaults_to_bf16_and_serve_names_the_fp8_problem(tiny_qwen3, capsys):
    from mixquant.cli import main
    from mixquant.config import EngineConfig

    assert EngineConfig(model=str(tiny_qwen3), device="cpu").prefill_attention == "bf16"
    assert main(["serve", str(tiny_qwen3), "--device", "cpu", "--prefill-attention", "fp8"]) == 2
    assert "prefill_attention='fp8' needs a CUDA GPU" in capsys.readouterr().err


def test_checkpoint_prefixes_map_and_drop_names(tiny_qwen3, tmp_path, monkeypatch, caplog):
    """A multimodal checkpoint served text-only: its text weights under another prefix, a tower to skip."""
    from safetensors.torch import load_file, save_file

    from mixquant.models.decoder import Qwen3ForCausalLM

    nested = tmp_path / "nested"
    shutil.copytree(tiny_qwen3, nested)
    tensors = {k.replace("model.", "model.language_model.", 1): v
               for k, v in load_file(nested / "model.safetensors").items()}
    tensors["model.visual.blocks.0.proj.weight"] = torch.zeros(4, 4)
    save_file(tensors, str(nested / "model.safetensors"))
    with pytest.raises(ValueError, match="no place for: .*model.language_model"):
        LLM(str(nested), device="cpu", dtype="float32")
    monkeypatch.setattr(Qwen3ForCausalLM, "checkpoint_prefixes",
                        {"model.language_model.": "model.", "model.visual.": None})
    with caplog.at_level("INFO", logger="mixquant.models.loader"):
        nested_llm = LLM(str(nested), device="cpu", dtype="float32")
    assert "skipped 1 checkpoint tensors under model.visual." in caplog.text
    plain = LLM(str(tiny_qwen3), device="cpu", dtype="float32")
    for (name, a), (_, b) in zip(nested_llm.engine.runner.model.named_parameters(),
                                 plain.engine.runner.model.named_parameters()):
        assert torch.equal(a, b), name


def test_a_kv_cache_smaller_than_one_sequence_is_refused(tiny_qwen3):
    """A sequence that outgrows the whole cache would preempt itself to grow, forever: refused at start-up."""
    with pytest.raises(ValueError, match="KV cache holds 48 tokens, fewer than max_model_len=1024"):
        LLM(str(tiny_qwen3), device="cpu", dtype="float32", block_size=4, num_kv_blocks=12)
    llm = LLM(str(tiny_qwen3), device="cpu", dtype="float32", block_size=4, num_kv_blocks=12, max_model_len=48)
    result = llm.generate("a prompt that grows to the end of the cache",
                          SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False)[0]
    assert result.outputs[0].finish_reason == "length"
    assert len(result.prompt_token_ids) + len(result.outputs[0].token_ids) == 48
