"""Builds a model, fills it from checkpoints, and gives every linear layer its per-phase methods.

The precision of each (layer, phase) is decided here and nowhere else: the phase's precision from the engine
config, except for layers a checkpoint's `ignore` list or the user's `unquantized_layers` keep unquantized.
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mixquant.config import EngineConfig, Phase, kernel_mode
from mixquant.layers.linear import Linear
from mixquant.models.decoder import CausalLM
from mixquant.models.registry import model_class
from mixquant.quantization import compressed_tensors as ct
from mixquant.quantization.linear_methods import (
    ActivationGroup, BF16Method, FP8Method, LinearMethod, NoDecodeMethod, NVFP4Method)
from mixquant.utils.hf import iterate_tensors

# checkpoint module -> (our fused module, shard index)
FUSED_SHARDS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
IGNORED_TENSORS = ("rotary_emb.inv_freq",)


def model_module_for(checkpoint_module: str) -> tuple[str, int]:
    parent, _, leaf = checkpoint_module.rpartition(".")
    if leaf in FUSED_SHARDS:
        fused, shard = FUSED_SHARDS[leaf]
        return f"{parent}.{fused}", shard
    return checkpoint_module, 0


def build_model(hf_config, dtype: torch.dtype, device: torch.device, max_position: int) -> CausalLM:
    cls = model_class(hf_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are born in the model dtype, on the device: no fp32 copy of 8B weights
    try:
        with torch.device(device):
            return cls(hf_config, max_position)
    finally:
        torch.set_default_dtype(previous)


def load_weights(model: CausalLM, tensors: Iterable[tuple[str, torch.Tensor]], quantized: set[str] = frozenset()):
    """Copies a Hugging Face state dict (possibly sharded q/k/v, gate/up) into the model; every parameter must come,
    but the weights of `quantized` layers (their pre-quantized tensors are read apart)."""
    modules = dict(model.named_modules())
    expected = {name for name, _ in model.named_parameters()}
    for layer in model.linear_layers():  # a fused layer is complete only when every shard came
        for param in ("weight", "bias") if layer.bias is not None else ("weight",):
            expected.discard(f"{layer.prefix}.{param}")
            if not (param == "weight" and layer.prefix in quantized):
                expected.update(f"{parent}.{param}" for parent in layer.shard_module_names())
    loaded: set[str] = set()
    unexpected: list[str] = []
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in tensors:
        if name.endswith(IGNORED_TENSORS) or (tied and name == "lm_head.weight"):
            continue
        module_name, _, param_name = name.rpartition(".")
        target, shard = model_module_for(module_name)
        module = modules.get(target)
        if target in quantized and param_name != "bias":
            continue
        if isinstance(module, Linear):
            module.load_shard(param_name, tensor, shard)
            loaded.add(name)
        elif module is not None and hasattr(module, param_name):
            param = getattr(module, param_name)
            if param.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, model shape {tuple(param.shape)}")
            param.data.copy_(tensor)
            loaded.add(name)
        else:
            unexpected.append(name)
    if unexpected:
        raise ValueError(f"checkpoint tensors the model has no place for: {', '.join(unexpected[:8])}"
                         + (" ..." if len(unexpected) > 8 else ""))
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:5])}")


def init_dummy_weights(model: CausalLM, seed: int):
    """Random weights in real shapes, for benchmarks; norms stay 1 so activations keep a sane scale."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=gen)


@dataclass
class PrequantizedCheckpoint:
    """Tensors of a compressed-tensors checkpoint, per (our fused module, shard)."""

    scheme: ct.QuantScheme
    tensors: dict[str, dict[int, dict[str, torch.Tensor]]] = field(default_factory=lambda: defaultdict(dict))


def read_prequantized(path: Path, device: torch.device) -> PrequantizedCheckpoint:
    config = json.loads((path / "config.json").read_text())
    if "quantization_config" not in config:
        raise ValueError(f"prefill_model {path} has no quantization_config: it is not a compressed-tensors checkpoint")
    checkpoint = PrequantizedCheckpoint(ct.parse_quantization_config(config["quantization_config"]))
    suffixes = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale", "weight", "bias")
    for name, tensor in iterate_tensors(path):
        module_name, _, param_name = name.rpartition(".")
        if param_name not in suffixes or ".layers." not in module_name or "norm" in module_name:
            continue  # embeddings, norms and the head come from the BF16 model
        target, shard = model_module_for(module_name)
        checkpoint.tensors[target].setdefault(shard, {})[param_name] = tensor.to(device)
    return checkpoint


def load_prefill_checkpoint(model: CausalLM, path: Path, device: torch.device) -> PrequantizedCheckpoint:
    """A pre-quantized checkpoint as the only source of weights (an engine that only prefills): its quantized layers
    get their quantized tensors and no model-dtype weight; embeddings, norms, the head and the layers it keeps
    unquantized load as from a plain checkpoint."""
    checkpoint = read_prequantized(path, device)
    quantized = {layer.prefix for layer in model.linear_layers() if layer.prefix in checkpoint.tensors
                 and not _is_unquantized(layer, [], checkpoint.scheme.ignore)}
    load_weights(model, iterate_tensors(path), quantized)
    return checkpoint


def _checkpoint_method(layer: Linear, shards: dict[int, dict[str, torch.Tensor]], scheme: ct.QuantScheme,
                       native: bool, compute_dtype: torch.dtype) -> LinearMethod:
    if sorted(shards) != list(range(len(layer.output_sizes))):
        raise ValueError(f"{layer.prefix}: the prefill checkpoint has shards {sorted(shards)} of "
                         f"{len(layer.output_sizes)}")
    ordered = [shards[i] for i in range(len(layer.output_sizes))]
    bias = layer.bias
    if scheme.name == "fp8":
        qweight = torch.cat([s["weight"] for s in ordered])
        scale = torch.cat([s["weight_scale"].float().reshape(-1, 1).expand(s["weight"].shape[0], 1)
                           for s in ordered])
        return FP8Method(qweight, scale, bias, native)
    packed = torch.cat([s["weight_packed"] for s in ordered])
    block_scale = torch.cat([s["weight_scale"] for s in ordered])
    row_scales = torch.cat([s["weight_global_scale"].float().reshape(1, 1).expand(s["weight_packed"].shape[0], 1)
                            for s in ordered])
    groups = _activation_groups(layer, [s.get("input_global_scale") for s in ordered])
    return NVFP4Method(packed, block_scale, row_scales, groups, bias, native, compute_dtype,
                       quantize_activations=scheme.activations_quantized)


def _activation_groups(layer: Linear, input_scales: list[torch.Tensor | None]) -> list[ActivationGroup]:
    """Shards that share one activation global scale are quantized once; shards that differ keep their own."""
    offsets = layer.shard_offsets
    groups: list[ActivationGroup] = []
    for i, scale in enumerate(input_scales):
        previous = groups[-1].input_global_scale if groups else None
        same = groups and ((scale is None and previous is None) or
                           (scale is not None and previous is not None and torch.equal(scale, previous)))
        if same:
            groups[-1].end = offsets[i + 1]
        else:
            groups.append(ActivationGroup(offsets[i], offsets[i + 1], scale))
    return groups


def matches_user_layer(module_name: str, patterns: list[str]) -> bool:
    """A user's `unquantized_layers` entry: a full module name, a dotted suffix ("qkv_proj") or a `re:` regex."""
    return any(module_name == p or module_name.endswith("." + p) or ct.matches_ignore(module_name, [p])
               for p in patterns)


def _is_unquantized(layer: Linear, user_patterns: list[str], checkpoint_ignore: list[str]) -> bool:
    names = [layer.prefix, *layer.shard_module_names()]
    return any(matches_user_layer(n, user_patterns) or ct.matches_ignore(n, checkpoint_ignore) for n in names)


def assign_linear_methods(model: CausalLM, config: EngineConfig, compute_dtype: torch.dtype,
                          prequantized: PrequantizedCheckpoint | None):
    checkpoint_ignore = prequantized.scheme.ignore if prequantized else []
    device = config.device_obj
    for layer in model.linear_layers():
        methods: dict[str, LinearMethod] = {}

        def method(precision: str) -> LinearMethod:
            if _is_unquantized(layer, config.unquantized_layers, checkpoint_ignore):
                precision = "bf16"
            if precision not in methods:
                native = kernel_mode(precision, device) == "native"
                shards = prequantized.tensors.get(layer.prefix) if prequantized else None
                if precision == "bf16":
                    methods[precision] = BF16Method(layer.weight, layer.bias)
                elif shards and prequantized.scheme.name == precision:
                    methods[precision] = _checkpoint_method(layer, shards, prequantized.scheme, native, compute_dtype)
                elif precision == "fp8":
                    methods[precision] = FP8Method.from_weight(layer.weight, layer.bias, native)
                else:
                    methods[precision] = NVFP4Method.from_weight(layer.weight, layer.output_sizes, layer.bias,
                                                                 native, compute_dtype)
            return methods[precision]

        decode = NoDecodeMethod() if config.prefill_only else method(config.precision(Phase.DECODE))
        layer.set_methods(method(config.precision(Phase.PREFILL)), decode)
