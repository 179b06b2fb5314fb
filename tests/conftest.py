"""Tiny random models saved in Hugging Face format, built by the tests themselves (no hub access in CI)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.data import qwen3_tokenizer


def save_tiny_model(path: Path, arch: str = "qwen3", seed: int = 0, **overrides) -> Path:
    """A 2-layer model with the real Qwen3 tokenizer (tests/data), random weights, written as safetensors +
    config.json."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=1024, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, eos_token_id=151645, bos_token_id=None)
    common.update(overrides)
    config_cls = {"qwen3": Qwen3Config, "llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3_moe": Qwen3MoeConfig}[arch]
    if arch in ("qwen3", "llama", "qwen3_moe"):
        common.setdefault("head_dim", 16)
    config = config_cls(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # larger-than-init weights so that different tokens give clearly different logits
            if "norm" not in name:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen3_tokenizer() / name, path / name)
    (path / "generation_config.json").write_text('{"eos_token_id": [151645, 151643]}')
    return path


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3")


# 8 experts, 2 a token; layer 1 keeps a dense MLP (mlp_only_layers), so both kinds of layer run
TINY_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                decoder_sparse_step=1, mlp_only_layers=[1])


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen3-moe"), "qwen3_moe", **TINY_MOE)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")
