"""The compressed-tensors checkpoint format (what llm-compressor writes and vLLM reads) for NVFP4 and FP8 Linears.

Covers the `quantization_config` of config.json (formats.md 1.1) and the safetensors entries of one quantized
Linear (formats.md 1.2). Only single-group checkpoints of the NVFP4 / NVFP4A16 / FP8_DYNAMIC presets are accepted;
anything else is refused with a ValueError that names what was found.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mixquant.quantization import fp8, nvfp4

NVFP4_FORMAT = "nvfp4-pack-quantized"
FP8_FORMAT = "float-quantized"

_QUANT_METHOD = "compressed-tensors"
_FORMAT_TO_SCHEME = {NVFP4_FORMAT: "nvfp4", FP8_FORMAT: "fp8"}

# QuantizationArgs as the NVFP4 / FP8_DYNAMIC presets resolve them; a tuple lists accepted alternatives.
_NVFP4_ARGS = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True}
_NVFP4_WEIGHTS = {**_NVFP4_ARGS, "dynamic": False, "scale_dtype": (None, "float8_e4m3fn")}
_NVFP4_INPUTS = {**_NVFP4_ARGS, "dynamic": "local", "scale_dtype": (None, "float8_e4m3fn")}
_FP8_ARGS = {"num_bits": 8, "type": "float", "symmetric": True}
_FP8_WEIGHTS = {**_FP8_ARGS, "strategy": ("channel", "tensor"), "dynamic": False}
_FP8_INPUTS = {**_FP8_ARGS, "strategy": "token", "dynamic": True}


@dataclass
class QuantScheme:
    """What the engine needs to know about a checkpoint's quantization."""

    name: Literal["nvfp4", "fp8"]
    ignore: list[str]
    targets: list[str]
    # "local" (NVFP4: block scales computed per token at runtime, static input_global_scale), True (FP8: per-token
    # scales at runtime) or False (weight-only NVFP4A16: activations stay in high precision).
    input_dynamic: bool | str
    weight_strategy: str  # "tensor_group" (NVFP4), "channel" or "tensor" (FP8)
    activations_quantized: bool


def parse_quantization_config(quantization_config: dict[str, Any]) -> QuantScheme:
    """Read config.json's `quantization_config`; ValueError for anything this engine cannot run exactly."""
    config = quantization_config
    if config.get("quant_method") != _QUANT_METHOD:
        raise ValueError(f"quant_method must be {_QUANT_METHOD!r}, found {config.get('quant_method')!r}")
    groups = config.get("config_groups") or {}
    if len(groups) != 1:
        raise ValueError(f"expected exactly one config group, found {len(groups)}: {sorted(groups)}")
    if config.get("quantization_status", "compressed") != "compressed":
        raise ValueError(f"expected quantization_status 'compressed', found {config['quantization_status']!r}")
    for unsupported in ("kv_cache_scheme", "transform_config"):
        if config.get(unsupported):
            raise ValueError(f"unsupported {unsupported}: {config[unsupported]!r}")
    if (config.get("sparsity_config") or {}).get("format", "dense") != "dense":
        raise ValueError(f"unsupported sparsity_config: {config['sparsity_config']!r}")

    group = next(iter(groups.values()))
    if not isinstance(group, dict):
        raise ValueError(f"expected the config group to be a scheme, found {group!r}")
    checkpoint_format = group.get("format") or config.get("format")
    if checkpoint_format not in _FORMAT_TO_SCHEME:
        raise ValueError(f"unsupported format {checkpoint_format!r}; supported: {sorted(_FORMAT_TO_SCHEME)}")
    name = _FORMAT_TO_SCHEME[checkpoint_format]
    if group.get("output_activations") is not None:
        raise ValueError(f"output activation quantization is not supported, found {group['output_activations']!r}")
    if group.get("weights") is None:
        raise ValueError(f"{checkpoint_format}: the config group has no weights quantization")

    expected_weights, expected_inputs = (_NVFP4_WEIGHTS, _NVFP4_INPUTS) if name == "nvfp4" else (_FP8_WEIGHTS,
                                                                                                   _FP8_INPUTS)
    weights = _checked_args(group["weights"], expected_weights, f"{checkpoint_format} weights")
    inputs = group.get("input_activations")
    if inputs is None and name == "fp8":
        raise ValueError(f"{checkpoint_format}: weight-only FP8 (no input_activations) is not supported")
    if inputs is not None:
        inputs = _checked_args(inputs, expected_inputs, f"{checkpoint_format} input_activations")
    return QuantScheme(
        name=name,
        ignore=list(config.get("ignore") or []),
        targets=list(group.get("targets") or []),
        input_dynamic=inputs["dynamic"] if inputs else False,
        weight_strategy=weights["strategy"],
        activations_quantized=inputs is not None,
    )


def build_quantization_config(scheme: Literal["nvfp4", "fp8"], ignore: list[str]) -> dict[str, Any]:
    """The `quantization_config` for config.json of a checkpoint written with `compress_linear`.

    Field layout of llm-compressor's NVFP4 / FP8_DYNAMIC output with every QuantizationArgs field spelled out, as
    compressed-tensors 0.12 serialized it (0.10 through 0.20 parse it). `scale_dtype`, which newer writers add, is
    left out: it would only restate the float8_e4m3fn block scales that every reader assumes for NVFP4.
    """
    if scheme == "nvfp4":
        checkpoint_format = NVFP4_FORMAT
        weights = _serialized_args(num_bits=4, strategy="tensor_group", group_size=16, dynamic=False,
                                   observer="minmax")
        inputs = _serialized_args(num_bits=4, strategy="tensor_group", group_size=16, dynamic="local",
                                  observer="static_minmax")
    elif scheme == "fp8":
        checkpoint_format = FP8_FORMAT
        weights = _serialized_args(num_bits=8, strategy="channel", group_size=None, dynamic=False, observer="minmax")
        inputs = _serialized_args(num_bits=8, strategy="token", group_size=None, dynamic=True, observer=None)
    else:
        raise ValueError(f"unknown scheme {scheme!r}; expected 'nvfp4' or 'fp8'")
    return {
        "quant_method": _QUANT_METHOD,
        "format": checkpoint_format,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": inputs,
                "output_activations": None,
                "format": checkpoint_format,
            }
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def matches_ignore(module_name: str, ignore: list[str]) -> bool:
    """Whether an `ignore` entry names this module, as compressed-tensors and vLLM match it.

    Plain entries must equal the full module name (`lm_head` does not match `model.lm_head`); `re:` entries are
    Python regexes applied with re.match, i.e. anchored at the start only (`re:.*mlp.gate$` needs its `$`).
    """
    return any(
        re.match(entry.removeprefix("re:"), module_name) is not None if entry.startswith("re:")
        else entry == module_name
        for entry in ignore
    )


def compress_linear(name: str, weight: torch.Tensor, scheme: QuantScheme | Literal["nvfp4", "fp8"],
                    input_amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Safetensors entries of the Linear module `name` with weight [N, K], as `build_quantization_config` declares.

    NVFP4: `weight_packed`, `weight_scale`, `weight_global_scale` from the tensor's own amax, and
    `input_global_scale` when input_amax (the calibrated activation absmax) is given. FP8: `weight` and a per-channel
    `weight_scale`; activations are scaled per token at runtime, so input_amax is not used.
    """
    return compress_linear_group([name], [weight], scheme, input_amax)


def compress_linear_group(names: list[str], weights: list[torch.Tensor],
                          scheme: QuantScheme | Literal["nvfp4", "fp8"],
                          input_amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Like `compress_linear` for Linears that an engine fuses (q/k/v, gate/up) and that share one input.

    NVFP4 shards get ONE weight global scale from their joint amax, as llm-compressor does (formats.md 1.5), so a
    fused GEMM can use a single alpha. Statistics are taken in the weights' dtype, like llm-compressor's observers,
    so a bf16 model compresses to exactly the bytes llm-compressor writes for it.
    """
    scheme_name = _writable_scheme_name(scheme)
    if len(names) != len(weights):
        raise ValueError(f"{len(names)} names for {len(weights)} weights")
    tensors: dict[str, torch.Tensor] = {}
    if scheme_name == "fp8":
        for name, weight in zip(names, weights):
            tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"] = fp8.quantize_rowwise(weight)
        return tensors

    joint_amax = torch.stack([weight.abs().amax() for weight in weights]).amax()
    weight_global_scale = nvfp4.global_scale_from_amax(joint_amax).reshape(1)
    for name, weight in zip(names, weights):
        packed, block_scale = nvfp4.quantize(weight, weight_global_scale, statistics_dtype=weight.dtype)
        tensors[f"{name}.weight_packed"] = packed
        tensors[f"{name}.weight_scale"] = block_scale
        tensors[f"{name}.weight_global_scale"] = weight_global_scale.clone()
        if input_amax is not None:
            tensors[f"{name}.input_global_scale"] = nvfp4.global_scale_from_amax(input_amax).reshape(1)
    return tensors


def decompress_linear(tensors: dict[str, torch.Tensor], name: str,
                      scheme: QuantScheme | Literal["nvfp4", "fp8"]) -> torch.Tensor:
    """The float32 weight [N, K] of Linear `name` from its checkpoint entries (per-channel or per-tensor FP8)."""
    scheme_name = scheme if isinstance(scheme, str) else scheme.name
    if scheme_name == "fp8":
        return fp8.dequantize_rowwise(tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"])
    return nvfp4.dequantize(tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"],
                            tensors[f"{name}.weight_global_scale"])


def _writable_scheme_name(scheme: QuantScheme | str) -> str:
    if isinstance(scheme, str):
        if scheme not in ("nvfp4", "fp8"):
            raise ValueError(f"unknown scheme {scheme!r}; expected 'nvfp4' or 'fp8'")
        return scheme
    # The writer only produces what build_quantization_config declares.
    if scheme.name == "fp8" and scheme.weight_strategy != "channel":
        raise ValueError(f"FP8 weights are written per channel, the scheme asks for {scheme.weight_strategy!r}")
    return scheme.name


def _serialized_args(num_bits: int, strategy: str, group_size: int | None, dynamic: bool | str,
                     observer: str | None) -> dict[str, Any]:
    return {
        "num_bits": num_bits,
        "type": "float",
        "symmetric": True,
        "group_size": group_size,
        "strategy": strategy,
        "block_structure": None,
        "dynamic": dynamic,
        "actorder": None,
        "observer": observer,
        "observer_kwargs": {},
    }


def _checked_args(args: dict[str, Any], expected: dict[str, Any], role: str) -> dict[str, Any]:
    """QuantizationArgs with compressed-tensors' defaults filled in, checked against `expected`."""
    resolved = _resolved_args(args)
    found = {key: resolved[key] for key in expected}
    if any(found[key] not in (value if isinstance(value, tuple) else (value,)) for key, value in expected.items()):
        raise ValueError(f"unsupported {role}: expected {expected}, found {found}")
    return resolved


def _resolved_args(args: dict[str, Any]) -> dict[str, Any]:
    """Fill in what compressed-tensors' QuantizationArgs defaults or infers for keys a writer left out."""
    resolved = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": None,
                "dynamic": False, "scale_dtype": None, **args}
    for key in ("type", "strategy", "dynamic"):
        if isinstance(resolved[key], str):
            resolved[key] = resolved[key].lower()
    if isinstance(resolved["scale_dtype"], str):
        resolved["scale_dtype"] = resolved["scale_dtype"].removeprefix("torch.")
    if resolved["strategy"] is None:
        group_size = resolved["group_size"]
        resolved["strategy"] = "tensor" if group_size is None else "channel" if group_size == -1 else "group"
    return resolved
