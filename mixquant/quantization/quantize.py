"""`mixquant quantize`: write a compressed-tensors checkpoint (NVFP4 W4A4 or FP8 dynamic) that vLLM reads too.

NVFP4 activations need a static per-tensor global scale: it is calibrated by running the BF16 model over
calibration text and recording each linear layer's (and each expert's) input absmax. Linear layers and experts
inside the decoder blocks are quantized, experts written one module per expert as llm-compressor writes them;
embeddings, norms, MoE routers and lm_head are copied unchanged.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from mixquant.config import EngineConfig
from mixquant.engine.llm_engine import LLMEngine
from mixquant.layers.activation import GATED_ACTIVATIONS
from mixquant.layers.fused_moe import GroupedExperts, Router
from mixquant.layers.linear import Linear
from mixquant.models.loader import STACKED_EXPERTS
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


def quantized_groups(model) -> list[list[str]]:
    """Checkpoint modules quantized as one group (they share an input, and the engine fuses them): q/k/v, gate/up,
    and each expert's gate/up; every other projection alone."""
    groups = []
    for layer in model.phase_routed_layers():
        if isinstance(layer, GroupedExperts):
            for e in range(layer.num_experts):
                groups += [[f"{layer.prefix}.{e}.gate_proj", f"{layer.prefix}.{e}.up_proj"],
                           [f"{layer.prefix}.{e}.down_proj"]]
        else:
            groups.append(layer.shard_module_names())
    return groups


def calibrate_input_amax(engine: LLMEngine, texts: list[str]) -> dict[str, torch.Tensor]:
    """Largest |input| seen by each quantized group over the calibration texts, keyed by the group's first module.

    An expert's inputs are the rows routed to it (and for down_proj, their gated activation); an expert no
    calibration row reached gets its layer's largest."""
    amax: dict[str, torch.Tensor] = {}

    def observe(key: str, x: torch.Tensor):
        seen = x.detach().abs().amax().float()
        amax[key] = torch.maximum(amax[key], seen) if key in amax else seen

    def linear_input(layer: Linear, args, kwargs):
        x = args[0]
        activation = kwargs.get("activation")
        observe(layer.shard_module_names()[0], GATED_ACTIVATIONS[activation](x) if activation else x)

    def experts_input(layer: GroupedExperts, args):
        x, _, topk_ids = args
        for e in topk_ids.unique().tolist():
            rows = x[(topk_ids == e).any(dim=-1)]
            observe(f"{layer.prefix}.{e}.gate_proj", rows)
            observe(f"{layer.prefix}.{e}.down_proj", GATED_ACTIVATIONS[layer.activation](rows @ layer.w13[e].t()))

    if engine.config.tensor_parallel_size > 1:
        raise ValueError("calibration hooks see one rank's part of each row-parallel layer's input: calibrate with "
                         "tensor_parallel_size=1")
    model = engine.runner.model
    hooks = [layer.register_forward_pre_hook(linear_input, with_kwargs=True) for layer in model.linear_layers()]
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    hooks += [layer.register_forward_pre_hook(experts_input) for layer in experts]
    try:
        for i, text in enumerate(texts):
            engine.add_request(f"calibration-{i}", text, SamplingParams(max_tokens=1))
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        for hook in hooks:
            hook.remove()
    for layer in experts:
        for shard in ("gate_proj", "down_proj"):
            keys = [f"{layer.prefix}.{e}.{shard}" for e in range(layer.num_experts)]
            largest = torch.stack([amax[k] for k in keys if k in amax]).amax()
            amax.update({k: largest for k in keys if k not in amax})
    return amax


def per_expert_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with 3-D expert tensors ([E, 2I, H] gate/up, [E, H, I] down) split into one module
    per expert: the names vLLM and llm-compressor read in quantized checkpoints."""
    out = {}
    for name, tensor in tensors.items():
        stacked = STACKED_EXPERTS.match(name)
        if stacked is None:
            out[name] = tensor
            continue
        for e, weight in enumerate(tensor):
            names = ["down_proj"] if stacked["name"] == "down_proj" else ["gate_proj", "up_proj"]
            for shard, part in zip(names, weight.chunk(len(names))):
                out[f"{stacked['experts']}.{e}.{shard}.weight"] = part
    return out


def router_ignore(model) -> list[str]:
    """`ignore` entries for the MoE routers (re:.*mlp.gate$ for Qwen3-MoE, as published recipes write it): they
    are never quantized, and a reader that targets every Linear must be told."""
    suffixes = {name.split(".layers.")[-1].split(".", 1)[-1] for name, m in model.named_modules()
                if isinstance(m, Router)}
    return [f"re:.*{suffix}$" for suffix in sorted(suffixes)]


def quantize_checkpoint(model: str, output: str | Path, scheme: str, calibration_texts: list[str] | None = None,
                        ignore: list[str] | None = None, device: str = "auto") -> Path:
    if scheme not in ("nvfp4", "fp8"):
        raise ValueError(f"--scheme must be nvfp4 or fp8, got {scheme!r}")
    output = Path(output)
    engine = LLMEngine(EngineConfig(model=model, prefill_precision="bf16", decode_precision="bf16",
                                    device=device, enable_prefix_caching=False, max_num_seqs=8))
    net = engine.runner.model
    ignore = list(ignore or []) + ["lm_head"] + router_ignore(net)
    input_amax = calibrate_input_amax(engine, calibration_texts or DEFAULT_CALIBRATION) if scheme == "nvfp4" else {}
    tensors = per_expert_tensors(dict(iterate_tensors(engine.model_path)))
    # our module name -> the checkpoint's (they differ under a multimodal checkpoint's text prefix)
    checkpoint_module = {ours.rpartition(".")[0]: name.rpartition(".")[0] for name in tensors
                         if (ours := net.checkpoint_name(name)) is not None}
    for group in quantized_groups(net):
        names = [checkpoint_module[n] for n in group]
        if any(ct.matches_ignore(n, ignore) for n in names):
            continue  # the whole group stays as it is, as the engine keeps a fused layer unquantized
        weights = [tensors.pop(f"{n}.weight") for n in names]
        tensors.update(ct.compress_linear_group(names, weights, scheme, input_amax.get(group[0])))  # bias stays

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
