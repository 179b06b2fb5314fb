"""Builds a model, fills it from checkpoints, and gives every linear layer its per-phase methods.

The precision of each (layer, phase) is decided here and nowhere else: the phase's precision from the engine
config, except for layers a checkpoint's `ignore` list or the user's `unquantized_layers` keep unquantized.

Under tensor parallelism every rank runs this same code on its own model: checkpoints are read through safetensors
slices, each layer narrowing them to its rank's part (Linear.shard_part, GroupedExperts.shard_part,
VocabEmbedding.load_weight) before anything is copied, and methods are built from those parts.
"""
from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mixquant.config import EngineConfig, Phase, kernel_mode
from mixquant.distributed.parallel_state import get_tp_size
from mixquant.layers.embed_head import VocabEmbedding
from mixquant.layers.fused_moe import EXPERT_SHARDS, GroupedExperts
from mixquant.layers.linear import Linear, PhaseRouted
from mixquant.models.decoder import CausalLM
from mixquant.models.registry import model_class
from mixquant.quantization import compressed_tensors as ct
from mixquant.quantization import nvfp4
from mixquant.quantization.expert_methods import BF16Experts, ExpertsMethod, FP8Experts, NVFP4Experts
from mixquant.quantization.linear_methods import (
    ActivationGroup, BF16Method, FP8Method, LinearMethod, NoDecodeMethod, NVFP4Method)
from mixquant.utils.hf import iterate_slices

logger = logging.getLogger(__name__)

# checkpoint module -> (our fused module, shard index)
FUSED_SHARDS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
                "in_proj_qkv": ("in_proj_qkvz", 0), "in_proj_z": ("in_proj_qkvz", 1)}  # Gated DeltaNet
IGNORED_TENSORS = ("rotary_emb.inv_freq",)
# experts as one module per expert (the hub's Qwen3-MoE, compressed-tensors checkpoints) or as 3-D tensors
EXPERT_MODULE = re.compile(rf"^(?P<experts>.+\.experts)\.(?P<expert>\d+)\.(?P<shard>{'|'.join(EXPERT_SHARDS)})$")
STACKED_EXPERTS = re.compile(r"^(?P<experts>.+\.experts)\.(?P<name>gate_up_proj|down_proj)$")


def model_module_for(checkpoint_module: str) -> tuple[str, int | tuple[int, str]]:
    """Our module for a checkpoint module, and which of its shards that is: an index into a fused Linear, or
    (expert, projection) of a GroupedExperts."""
    expert = EXPERT_MODULE.match(checkpoint_module)
    if expert:
        return expert["experts"], (int(expert["expert"]), expert["shard"])
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


def expected_tensors(model: CausalLM, quantized: set[str] = frozenset()) -> set[str]:
    """The checkpoint tensors a complete checkpoint holds, named per shard and per expert; the weights of the
    `quantized` layers are left out (a prefill-only engine reads their pre-quantized tensors apart)."""
    expected = {name for name, _ in model.named_parameters()}
    for layer in model.phase_routed_layers():
        if isinstance(layer, GroupedExperts):
            expected -= {f"{layer.prefix}.w13", f"{layer.prefix}.w2"}
            if layer.prefix not in quantized:
                expected.update(f"{layer.prefix}.{e}.{shard}.weight"
                                for e in range(layer.num_experts) for shard in EXPERT_SHARDS)
            continue
        for param in ("weight", "bias") if layer.bias is not None else ("weight",):
            expected.discard(f"{layer.prefix}.{param}")
            if not (param == "weight" and layer.prefix in quantized):
                expected.update(f"{parent}.{param}" for parent in layer.shard_module_names())
    return expected


def target_module(name: str) -> tuple[str, str]:
    """Our module a checkpoint tensor belongs to, and the tensor's own name in it."""
    stacked = STACKED_EXPERTS.match(name)
    if stacked:
        return stacked["experts"], stacked["name"]
    module_name, _, param_name = name.rpartition(".")
    return model_module_for(module_name)[0], param_name


def load_tensor(modules: dict[str, torch.nn.Module], name: str, tensor: torch.Tensor) -> list[str] | None:
    """Copies (this rank's part of) one checkpoint tensor, a torch tensor or a checkpoint slice, into the model;
    returns the expected tensors it stands for (None: no place)."""
    stacked = STACKED_EXPERTS.match(name)
    if stacked and isinstance(experts := modules.get(stacked["experts"]), GroupedExperts):
        shards = experts.load_stacked(stacked["name"], tensor)
        return [f"{experts.prefix}.{e}.{shard}.weight" for e in range(experts.num_experts) for shard in shards]
    module_name, _, param_name = name.rpartition(".")
    target, shard = model_module_for(module_name)
    module = modules.get(target)
    if isinstance(module, GroupedExperts) and param_name == "weight":
        module.load_expert(*shard, tensor)
        return [name]
    if isinstance(module, Linear):
        module.load_shard(param_name, tensor, shard)
        return [name]
    if isinstance(module, VocabEmbedding) and param_name == "weight":
        try:
            module.load_weight(tensor)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        return [name]
    if module is not None and isinstance(getattr(module, param_name, None), torch.Tensor):
        param = getattr(module, param_name)
        if param.shape != tensor.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, model shape {tuple(param.shape)}")
        param.data.copy_(tensor[...])
        return [name]
    return None


def load_weights(model: CausalLM, tensors: Iterable[tuple[str, torch.Tensor]], quantized: set[str] = frozenset()):
    """Copies a Hugging Face state dict (possibly sharded q/k/v, gate/up, experts per module or stacked) into the
    model; every parameter must come, but the weights of `quantized` layers (their pre-quantized tensors are read
    apart)."""
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    unexpected: list[str] = []
    tied = getattr(model.config, "tie_word_embeddings", False)
    skipped = 0
    for checkpoint_name, tensor in tensors:
        name = model.checkpoint_name(checkpoint_name)
        if name is None:
            skipped += 1
            continue
        if name.endswith(IGNORED_TENSORS) or (tied and name == "lm_head.weight"):
            continue
        target, param_name = target_module(name)
        if target in quantized and param_name != "bias":
            continue
        filled = load_tensor(modules, name, tensor)
        if filled is None:
            unexpected.append(name)
        else:
            loaded.update(filled)
    if unexpected:
        raise ValueError(f"checkpoint tensors the model has no place for: {', '.join(unexpected[:8])}"
                         + (" ..." if len(unexpected) > 8 else ""))
    missing = sorted(expected_tensors(model, quantized) - loaded)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:5])}")
    if skipped:
        dropped = [p for p, ours in model.checkpoint_prefixes.items() if ours is None]
        logger.info("text-only: skipped %d checkpoint tensors under %s", skipped, ", ".join(dropped))


def init_dummy_weights(model: CausalLM, seed: int):
    """Random weights in real shapes, for benchmarks; norms stay at scale 1 (0 where stored zero-centred) so
    activations keep a sane scale."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    zero_centred = {f"{name}.weight" for name, module in model.named_modules() if getattr(module, "unit_offset", False)}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(0.0 if name in zero_centred else 1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=gen)


ShardTensors = dict[str, torch.Tensor]  # a checkpoint module's tensors: weight_packed, weight_scale, ...


@dataclass
class PrequantizedCheckpoint:
    """Tensors of a compressed-tensors checkpoint, per our module and shard (see model_module_for)."""

    scheme: ct.QuantScheme
    tensors: dict[str, dict[int | tuple[int, str], ShardTensors]] = field(default_factory=lambda: defaultdict(dict))


# the tensors of a compressed-tensors module with an input dim, which a row-parallel layer splits: weights (FP8, or
# unquantized ones of ignored modules), NVFP4's packed bytes and block scales [N, K / 16]; FP8's weight_scale is per
# output channel [N, 1]
INPUT_DIM_TENSORS = {"fp8": ("weight",), "nvfp4": ("weight", "weight_packed", "weight_scale")}


def read_prequantized(model: CausalLM, path: Path, device: torch.device) -> PrequantizedCheckpoint:
    """The checkpoint's tensors of the model's phase-routed layers, each narrowed to this rank's part as it is read."""
    config = json.loads((path / "config.json").read_text())
    if "quantization_config" not in config:
        raise ValueError(f"prefill_model {path} has no quantization_config: it is not a compressed-tensors checkpoint")
    checkpoint = PrequantizedCheckpoint(ct.parse_quantization_config(config["quantization_config"]))
    suffixes = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale", "weight", "bias")
    input_dim = INPUT_DIM_TENSORS[checkpoint.scheme.name]
    modules = dict(model.named_modules())
    for checkpoint_name, tensor in iterate_slices(path):
        name = model.checkpoint_name(checkpoint_name)
        if name is None:
            continue
        module_name, _, param_name = name.rpartition(".")
        if param_name not in suffixes or ".layers." not in module_name or "norm" in module_name:
            continue  # embeddings, norms and the head come from the BF16 model
        target, shard = model_module_for(module_name)
        layer = modules.get(target)
        if not isinstance(layer, PhaseRouted):
            continue  # MoE routers, unquantized in every phase, come from the BF16 model too
        if param_name == "weight_packed":
            check_nvfp4_blocks(layer)
        part = layer.shard_part(shard, tensor, has_input_dim=param_name in input_dim)
        checkpoint.tensors[target].setdefault(shard, {})[param_name] = part.to(device)
    return checkpoint


def load_prefill_checkpoint(model: CausalLM, path: Path, device: torch.device) -> PrequantizedCheckpoint:
    """A pre-quantized checkpoint as the only source of weights (an engine that only prefills): its quantized layers
    (experts included) get their quantized tensors and no model-dtype weight; embeddings, norms, routers, the head
    and the layers it keeps unquantized load as from a plain checkpoint."""
    checkpoint = read_prequantized(model, path, device)
    quantized = {layer.prefix for layer in model.phase_routed_layers() if layer.prefix in checkpoint.tensors
                 and not _is_unquantized(layer, [], checkpoint.scheme.ignore)}
    load_weights(model, iterate_slices(path), quantized)
    return checkpoint


def check_nvfp4_blocks(layer: PhaseRouted):
    """NVFP4 quantizes blocks of 16 input columns, with one scale each: a rank must hold whole blocks."""
    inputs = ((layer.total_intermediate_size, layer.intermediate_size) if isinstance(layer, GroupedExperts)
              else (layer.total_input_size, layer.input_size))
    if inputs[1] % nvfp4.BLOCK_SIZE:
        split = f" ({inputs[0]} split over {get_tp_size()} ranks)" if inputs[0] != inputs[1] else ""
        raise ValueError(f"{layer.prefix}: NVFP4 quantizes blocks of {nvfp4.BLOCK_SIZE} input columns, which a rank "
                         f"holds whole, but this layer has {inputs[1]} input columns{split}")


def _checkpoint_method(prefix: str, output_sizes: list[int], shards: dict[int, ShardTensors],
                       bias: torch.Tensor | None, scheme: ct.QuantScheme, native: bool,
                       compute_dtype: torch.dtype, input_is_parallel: bool) -> LinearMethod:
    """The method of a linear map whose output rows are `output_sizes` checkpoint shards (the rank's rows of them),
    from their tensors."""
    if sorted(shards) != list(range(len(output_sizes))):
        raise ValueError(f"{prefix}: the prefill checkpoint has shards {sorted(shards)} of {len(output_sizes)}")
    ordered = [shards[i] for i in range(len(output_sizes))]
    if scheme.name == "fp8":
        qweight = torch.cat([s["weight"] for s in ordered])
        scale = torch.cat([s["weight_scale"].float().reshape(-1, 1).expand(s["weight"].shape[0], 1)
                           for s in ordered])
        return FP8Method(qweight, scale, bias, native, input_is_parallel)
    packed = torch.cat([s["weight_packed"] for s in ordered])
    block_scale = torch.cat([s["weight_scale"] for s in ordered])
    row_scales = torch.cat([s["weight_global_scale"].float().reshape(1, 1).expand(s["weight_packed"].shape[0], 1)
                            for s in ordered])
    groups = _activation_groups(output_sizes, [s.get("input_global_scale") for s in ordered])
    return NVFP4Method(packed, block_scale, row_scales, groups, bias, native, compute_dtype,
                       quantize_activations=scheme.activations_quantized, input_is_parallel=input_is_parallel)


def _checkpoint_experts(layer: GroupedExperts, shards: dict[tuple[int, str], ShardTensors],
                        scheme: ct.QuantScheme, native: bool, compute_dtype: torch.dtype) -> ExpertsMethod:
    """An experts method from per-expert checkpoint modules (experts.{e}.gate_proj / up_proj / down_proj)."""
    missing = [f"{e}.{s}" for e in range(layer.num_experts) for s in EXPERT_SHARDS if (e, s) not in shards]
    if missing:
        raise ValueError(f"{layer.prefix}: the prefill checkpoint lacks {len(missing)} expert modules, e.g. "
                         f"{', '.join(missing[:4])}")
    inter, hidden = layer.intermediate_size, layer.hidden_size
    gate_up = [_checkpoint_method(f"{layer.prefix}.{e}", [inter, inter],
                                  {0: shards[(e, "gate_proj")], 1: shards[(e, "up_proj")]}, None, scheme, native,
                                  compute_dtype, input_is_parallel=False) for e in range(layer.num_experts)]
    down = [_checkpoint_method(f"{layer.prefix}.{e}.down_proj", [hidden], {0: shards[(e, "down_proj")]}, None,
                               scheme, native, compute_dtype, input_is_parallel=layer.intermediate_is_parallel)
            for e in range(layer.num_experts)]
    if scheme.name == "fp8":
        return FP8Experts.stack(gate_up, down, native)
    return NVFP4Experts(gate_up, down)


def _activation_groups(output_sizes: list[int], input_scales: list[torch.Tensor | None]) -> list[ActivationGroup]:
    """Shards that share one activation global scale are quantized once; shards that differ keep their own."""
    offsets = [0]
    for size in output_sizes:
        offsets.append(offsets[-1] + size)
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


def checkpoint_module_names(layer: PhaseRouted) -> list[str]:
    """The checkpoint modules a layer stands for: its shards, or every projection of every expert."""
    if isinstance(layer, GroupedExperts):
        return [f"{layer.prefix}.{e}.{s}" for e in range(layer.num_experts) for s in EXPERT_SHARDS]
    return layer.shard_module_names()


def _is_unquantized(layer: PhaseRouted, user_patterns: list[str], checkpoint_ignore: list[str]) -> bool:
    names = [layer.prefix, *checkpoint_module_names(layer)]
    return any(matches_user_layer(n, user_patterns) or ct.matches_ignore(n, checkpoint_ignore) for n in names)


def _build_method(layer: PhaseRouted, precision: str, native: bool, compute_dtype: torch.dtype,
                  prequantized: PrequantizedCheckpoint | None):
    """A layer's method in one precision: from the prefill checkpoint where it holds this layer in this precision,
    else quantized at load from the model-dtype weights."""
    shards = prequantized.tensors.get(layer.prefix) if prequantized else None
    from_checkpoint = precision != "bf16" and shards and prequantized.scheme.name == precision
    if precision == "nvfp4":
        check_nvfp4_blocks(layer)
    if isinstance(layer, GroupedExperts):
        parallel = layer.intermediate_is_parallel
        if precision == "bf16":
            return BF16Experts(layer.w13, layer.w2)
        if from_checkpoint:
            return _checkpoint_experts(layer, shards, prequantized.scheme, native, compute_dtype)
        if precision == "fp8":
            return FP8Experts.from_weight(layer.w13, layer.w2, native, parallel)
        return NVFP4Experts.from_weight(layer.w13, layer.w2, native, compute_dtype, parallel)
    bias, parallel = layer.method_bias, layer.input_is_parallel
    if precision == "bf16":
        return BF16Method(layer.weight, bias)
    if from_checkpoint:
        return _checkpoint_method(layer.prefix, layer.output_sizes, shards, bias, prequantized.scheme, native,
                                  compute_dtype, parallel)
    if precision == "fp8":
        return FP8Method.from_weight(layer.weight, bias, native, parallel)
    return NVFP4Method.from_weight(layer.weight, layer.output_sizes, bias, native, compute_dtype, parallel)


def assign_methods(model: CausalLM, config: EngineConfig, compute_dtype: torch.dtype,
                   prequantized: PrequantizedCheckpoint | None):
    """Gives every phase-routed layer (linear layers, experts) its prefill and decode methods."""
    checkpoint_ignore = prequantized.scheme.ignore if prequantized else []
    for layer in model.phase_routed_layers():
        unquantized = _is_unquantized(layer, config.unquantized_layers, checkpoint_ignore)
        methods: dict[str, object] = {}

        def method(precision: str):
            precision = "bf16" if unquantized else precision
            if precision not in methods:
                native = kernel_mode(precision, config.device_obj) == "native"
                methods[precision] = _build_method(layer, precision, native, compute_dtype, prequantized)
            return methods[precision]

        decode = NoDecodeMethod() if config.prefill_only else method(config.precision(Phase.DECODE))
        layer.set_methods(method(config.precision(Phase.PREFILL)), decode)
