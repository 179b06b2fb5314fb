"""Tiny random models saved in Hugging Face format, built by the tests themselves (no hub access in CI)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.data import qwen3_tokenizer


def save_tiny_model(path: Path, arch: str = "qwen3", seed: int = 0, **overrides) -> Path:
    """A 2-layer model (4 for Qwen3.5) with the real Qwen3 tokenizer (tests/data), random weights, written as
    safetensors + config.json."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=1024, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, eos_token_id=151645, bos_token_id=None)
    if arch in QWEN3_5_ARCHS:
        common.update(TINY_QWEN3_5)
    common.update(overrides)
    if arch in QWEN3_5_ARCHS:
        model = _qwen3_5_model(arch, common, seed)
    else:
        config_cls = {"qwen3": Qwen3Config, "llama": LlamaConfig, "qwen2": Qwen2Config,
                      "qwen3_moe": Qwen3MoeConfig}[arch]
        if arch in ("qwen3", "llama", "qwen3_moe"):
            common.setdefault("head_dim", 16)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config_cls(**common), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # larger-than-init weights so that different tokens give clearly different logits; Qwen3.5's norms
            # scale by (1 + w), so theirs move off zero too
            if "norm" not in name:
                p.normal_(0, 0.08)
            elif arch in QWEN3_5_ARCHS:
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen3_tokenizer() / name, path / name)
    if arch in QWEN3_5_ARCHS:
        shutil.copy(QWEN3_5_CHAT_TEMPLATE, path / "chat_template.jinja")
    (path / "generation_config.json").write_text('{"eos_token_id": [151645, 151643]}')
    return path


# Qwen3.5: Gated DeltaNet layers (2 key heads serving 4 value heads) around a gated full-attention layer, RoPE on
# the first quarter of each 32-dim head. The real Qwen3.5 tokenizer is not vendored: the test models carry Qwen3's,
# with a chat template that renders Qwen3.5's format (tools as XML calls, thinking opened by the template).
QWEN3_5_ARCHS = ("qwen3_5", "qwen3_5_moe")
TINY_QWEN3_5 = dict(num_hidden_layers=4, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                    linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                    layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"])
TINY_QWEN3_5_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                        shared_expert_intermediate_size=48)
QWEN3_5_CHAT_TEMPLATE = Path(__file__).resolve().parent / "qwen3_5_chat_template.jinja"


def _qwen3_5_model(arch: str, text: dict, seed: int):
    """Qwen3.5 dense as the hub ships it, multimodal (a vision tower the engine skips); the MoE one text-only."""
    from transformers import (Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3_5MoeForCausalLM,
                              Qwen3_5MoeTextConfig)

    torch.manual_seed(seed)
    if arch == "qwen3_5_moe":
        text = {**TINY_QWEN3_5_MOE, **text}
        text.pop("intermediate_size")
        return Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**text)).float()
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"])
    config = Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"])
    return Qwen3_5ForConditionalGeneration(config).float()


@pytest.fixture(scope="session")
def tiny_qwen3_5(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen3.5"), "qwen3_5")


@pytest.fixture(scope="session")
def tiny_qwen3_5_moe(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen3.5-moe"), "qwen3_5_moe")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3")


# 8 experts, 2 a token; layer 1 keeps a dense MLP (mlp_only_layers), so both kinds of layer run
TINY_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                decoder_sparse_step=1, mlp_only_layers=[1])


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen3-moe"), "qwen3_moe", **TINY_MOE)


# Gemma 4 in miniature, with each of its layer kinds: two sliding-window layers (head_dim 16, 2 KV heads, a window of
# 8) and a full one (head_dim 32, 1 KV head, K = V); the MoE variant adds 4 experts, 2 a token, beside each MLP.
TINY_GEMMA4 = dict(vocab_size=151936, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                   num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=8,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                   hidden_size_per_layer_input=0, final_logit_softcapping=30.0, max_position_embeddings=1024,
                   rms_norm_eps=1e-6, bos_token_id=None, pad_token_id=0)
TINY_GEMMA4_MOE = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32)
# Gemma 4's control tokens, added to the Qwen3 tokenizer as special tokens (as they are in Gemma's own)
GEMMA4_CONTROL_TOKENS = ["<bos>", "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>", "<|tool>", "<tool|>",
                         "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>']
GEMMA4_CHAT_TEMPLATE = Path(__file__).with_name("gemma4_chat_template.jinja")


def gemma4_tokenizer():
    """The Qwen3 tokenizer with Gemma 4's control tokens and chat template (tests/gemma4_chat_template.jinja)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(qwen3_tokenizer()))
    tokenizer.add_tokens(GEMMA4_CONTROL_TOKENS, special_tokens=True)
    tokenizer.bos_token, tokenizer.eos_token = "<bos>", "<turn|>"
    tokenizer.chat_template = GEMMA4_CHAT_TEMPLATE.read_text()
    return tokenizer


def save_tiny_gemma4(path: Path, moe: bool = False, seed: int = 0) -> Path:
    """A Gemma4ForConditionalGeneration as the hub's: the language model under model.language_model, a (tiny)
    vision tower beside it; every weight random, norms and scales around 1, with Gemma's tokens and template."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4TextConfig

    text = Gemma4TextConfig(**TINY_GEMMA4, **(TINY_GEMMA4_MOE if moe else {}))
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=8)
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(Gemma4Config(text_config=text.to_dict(), vision_config=vision,
                                                        audio_config=None)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("scale", "layer_scalar")):  # multipliers: around 1, all different
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    tokenizer = gemma4_tokenizer()
    tokenizer.save_pretrained(path)
    (path / "generation_config.json").write_text(f'{{"eos_token_id": [{tokenizer.eos_token_id}]}}')
    return path


@pytest.fixture(scope="session")
def tiny_gemma4(tmp_path_factory) -> Path:
    return save_tiny_gemma4(tmp_path_factory.mktemp("tiny-gemma4"))


@pytest.fixture(scope="session")
def tiny_gemma4_moe(tmp_path_factory) -> Path:
    return save_tiny_gemma4(tmp_path_factory.mktemp("tiny-gemma4-moe"), moe=True)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")
