"""`mixquant quantize`: write a compressed-tensors checkpoint (NVFP4 W4A4 or FP8 dynamic) that vLLM reads too.

NVFP4 activations need a static per-tensor global scale: it is calibrated by running the BF16 model over
calibration text and recording each linear layer's input absmax. Linear layers inside the decoder blocks are
quantized; embeddings, norms and lm_head are copied unchanged.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from mixquant.config import EngineConfig
from mixquant.engine.llm_engine import LLMEngine
from mixquant.layers.linear import Linear
from mixquant.quantization import compressed_tensors as ct
from mixquant.sampling_params import SamplingParams
from mixquant.utils.hf import iterate_tensors

DEFAULT_CALIBRATION = [
    "The quick brown fox jumps over the lazy dog. " * 8,
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n" * 3,
    "User: What is the capital of France?\nAssistant: The capital of France is Paris, a city on the Seine.",
    "Tool output: {\"id\": 17, \"name\": \"widget\", \"price\": 9.99, \"stock\": 120, \"tags\": [\"a\", \"b\"]}\n" * 4,
    "In 1905 Einstein published four papers on the photoelectric effect, Brownian motion, special relativity, "
    "and mass-energy equivalence. Each changed physics. 12 + 35 = 47; 3.14159 * 2 = 6.28318.",
]
CHECKPOINT_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                         "merges.txt", "generation_config.json", "chat_template.jinja", "tokenizer.model")
SHARD_BYTES = 4 << 30


def calibrate_input_amax(engine: LLMEngine, texts: list[str]) -> dict[str, torch.Tensor]:
    """Largest |input| seen by each linear layer over the calibration texts."""
    amax: dict[str, torch.Tensor] = {}

    def record(layer: Linear, args):
        seen = args[0].detach().abs().amax().float()
        amax[layer.prefix] = torch.maximum(amax[layer.prefix], seen) if layer.prefix in amax else seen

    hooks = [layer.register_forward_pre_hook(record) for layer in engine.runner.model.linear_layers()]
    try:
        for i, text in enumerate(texts):
            engine.add_request(f"calibration-{i}", text, SamplingParams(max_tokens=1))
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        for hook in hooks:
            hook.remove()
    return amax


def quantize_checkpoint(model: str, output: str | Path, scheme: str, calibration_texts: list[str] | None = None,
                        ignore: list[str] | None = None, device: str = "auto") -> Path:
    if scheme not in ("nvfp4", "fp8"):
        raise ValueError(f"--scheme must be nvfp4 or fp8, got {scheme!r}")
    output = Path(output)
    engine = LLMEngine(EngineConfig(model=model, prefill_precision="bf16", decode_precision="bf16",
                                    device=device, enable_prefix_caching=False, max_num_seqs=8))
    ignore = list(ignore or []) + ["lm_head"]
    input_amax = calibrate_input_amax(engine, calibration_texts or DEFAULT_CALIBRATION) if scheme == "nvfp4" else {}
    model = engine.runner.model
    layers = {layer.prefix: layer for layer in model.linear_layers()}
    shard_owner = {name: layer for layer in layers.values() for name in layer.shard_module_names()}

    original = dict(iterate_tensors(engine.model_path))
    # our module name -> the checkpoint's (they differ under a multimodal checkpoint's text prefix)
    checkpoint_module = {ours.rpartition(".")[0]: name.rpartition(".")[0] for name in original
                         if (ours := model.checkpoint_name(name)) is not None}
    tensors: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for name, tensor in original.items():
        module = name.rpartition(".")[0]
        ours = model.checkpoint_name(name)
        layer = shard_owner.get(ours.rpartition(".")[0]) if ours is not None else None
        if layer is None or not name.endswith(".weight") or ct.matches_ignore(module, ignore):
            tensors[name] = tensor.contiguous()
            continue
        if layer.prefix in done:
            continue
        done.add(layer.prefix)
        names = [checkpoint_module[n] for n in layer.shard_module_names()]
        weights = [original[f"{n}.weight"] for n in names]
        tensors.update(ct.compress_linear_group(names, weights, scheme, input_amax.get(layer.prefix)))
        for n in names:  # a bias stays as it is
            if f"{n}.bias" in original:
                tensors[f"{n}.bias"] = original[f"{n}.bias"]

    output.mkdir(parents=True, exist_ok=True)
    _save_sharded(tensors, output)
    config = json.loads((engine.model_path / "config.json").read_text())
    config["quantization_config"] = ct.build_quantization_config(scheme, ignore)
    (output / "config.json").write_text(json.dumps(config, indent=2))
    for side in CHECKPOINT_SIDE_FILES:
        if (engine.model_path / side).is_file():
            shutil.copy(engine.model_path / side, output / side)
    return output


def _save_sharded(tensors: dict[str, torch.Tensor], output: Path):
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(output / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(output / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    (output / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                    indent=2))
