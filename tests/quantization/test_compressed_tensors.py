from __future__ import annotations

import copy

import pytest
import torch

from mixquant.quantization import compressed_tensors as ct
from mixquant.quantization import fp8, nvfp4

# quantization_config as llm-compressor wrote it for NVFP4 in mid/late 2025 (compressed-tensors 0.12 dump style).
_OLD_STYLE_ARGS = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 16, "num_bits": 4,
                   "observer": "minmax", "observer_kwargs": {}, "strategy": "tensor_group", "symmetric": True,
                   "type": "float"}
OLD_STYLE_NVFP4 = {
    "config_groups": {"group_0": {"input_activations": {**_OLD_STYLE_ARGS, "dynamic": "local"},
                                  "output_activations": None, "targets": ["Linear"], "weights": _OLD_STYLE_ARGS}},
    "format": "nvfp4-pack-quantized", "global_compression_ratio": None, "ignore": ["lm_head"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
    "sparsity_config": {}, "transform_config": {}, "version": "0.12.2",
}
# The minimal form other writers use: everything else takes compressed-tensors' defaults.
MINIMAL_FP8_DYNAMIC = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head", "re:.*mlp.gate$"],
    "config_groups": {"group_0": {"targets": ["Linear"],
                                  "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                  "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                        "dynamic": True}}},
}


def test_parse_nvfp4_w4a4():
    scheme = ct.parse_quantization_config(OLD_STYLE_NVFP4)
    assert scheme == ct.QuantScheme(name="nvfp4", ignore=["lm_head"], targets=["Linear"], input_dynamic="local",
                                    weight_strategy="tensor_group", activations_quantized=True)


def test_parse_nvfp4a16_weight_only():
    config = copy.deepcopy(OLD_STYLE_NVFP4)
    config["config_groups"]["group_0"]["input_activations"] = None
    scheme = ct.parse_quantization_config(config)
    assert scheme.name == "nvfp4" and not scheme.activations_quantized and scheme.input_dynamic is False


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_parse_fp8_dynamic(strategy):
    config = copy.deepcopy(MINIMAL_FP8_DYNAMIC)
    config["config_groups"]["group_0"]["weights"]["strategy"] = strategy
    scheme = ct.parse_quantization_config(config)
    assert scheme == ct.QuantScheme(name="fp8", ignore=["lm_head", "re:.*mlp.gate$"], targets=["Linear"],
                                    input_dynamic=True, weight_strategy=strategy, activations_quantized=True)


def _edited(config: dict, path: tuple[str, ...], value) -> dict:
    config = copy.deepcopy(config)
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return config


W = ("config_groups", "group_0", "weights")
A = ("config_groups", "group_0", "input_activations")


@pytest.mark.parametrize("config,message", [
    (_edited(OLD_STYLE_NVFP4, ("quant_method",), "gptq"), "quant_method.*'gptq'"),
    (_edited(OLD_STYLE_NVFP4, ("format",), "pack-quantized"), "format 'pack-quantized'"),
    (_edited(OLD_STYLE_NVFP4, ("format",), "mxfp4-pack-quantized"), "format 'mxfp4-pack-quantized'"),
    (_edited(OLD_STYLE_NVFP4, W + ("group_size",), 32), "'group_size': 32"),
    (_edited(OLD_STYLE_NVFP4, W + ("num_bits",), 8), "'num_bits': 8"),
    (_edited(OLD_STYLE_NVFP4, W + ("type",), "int"), "'type': 'int'"),
    (_edited(OLD_STYLE_NVFP4, W + ("symmetric",), False), "'symmetric': False"),
    (_edited(OLD_STYLE_NVFP4, A + ("dynamic",), False), "input_activations.*'dynamic': False"),
    (_edited(OLD_STYLE_NVFP4, ("kv_cache_scheme",), {"num_bits": 8, "type": "float"}), "kv_cache_scheme"),
    (_edited(OLD_STYLE_NVFP4, ("transform_config",), {"config_groups": {"u": {}}}), "transform_config"),
    (_edited(OLD_STYLE_NVFP4, ("sparsity_config",), {"format": "sparse-24-bitmask"}), "sparsity_config"),
    (_edited(OLD_STYLE_NVFP4, ("config_groups", "group_1"), {}), "one config group, found 2"),
    (_edited(OLD_STYLE_NVFP4, ("config_groups", "group_0"), ["Linear"]), "scheme, found \\['Linear'\\]"),
    (_edited(OLD_STYLE_NVFP4, ("quantization_status",), "frozen"), "'frozen'"),
    (_edited(OLD_STYLE_NVFP4, ("config_groups", "group_0", "output_activations"), {"num_bits": 8}), "output"),
    (_edited(MINIMAL_FP8_DYNAMIC, W + ("strategy",), "block"), "'strategy': 'block'"),
    (_edited(MINIMAL_FP8_DYNAMIC, A + ("strategy",), "tensor"), "input_activations.*'strategy': 'tensor'"),
    (_edited(MINIMAL_FP8_DYNAMIC, A + ("dynamic",), False), "'dynamic': False"),
    (_edited(MINIMAL_FP8_DYNAMIC, A, None), "weight-only FP8"),
])
def test_parse_rejects_what_it_cannot_run(config, message):
    with pytest.raises(ValueError, match=message):
        ct.parse_quantization_config(config)


@pytest.mark.parametrize("scheme", ["nvfp4", "fp8"])
def test_build_then_parse_round_trips(scheme):
    config = ct.build_quantization_config(scheme, ["lm_head"])
    assert config["quant_method"] == "compressed-tensors" and config["quantization_status"] == "compressed"
    assert config["format"] == config["config_groups"]["group_0"]["format"]
    assert config["config_groups"]["group_0"]["output_activations"] is None and config["kv_cache_scheme"] is None
    parsed = ct.parse_quantization_config(config)
    assert parsed.name == scheme and parsed.ignore == ["lm_head"] and parsed.activations_quantized


@pytest.mark.parametrize("name,ignore,expected", [
    ("lm_head", ["lm_head"], True),
    ("model.lm_head", ["lm_head"], False),  # no suffix matching
    ("model.layers.0.mlp.gate", ["re:.*mlp.gate$"], True),
    ("model.layers.0.mlp.gate_proj", ["re:.*mlp.gate$"], False),
    ("model.layers.0.mlp.gate_proj", ["re:.*mlp.gate"], True),  # re.match: anchored at the start only
    ("model.layers.10.self_attn.q_proj", ["re:model.layers.1"], True),
    ("x.model.layers.1.q", ["re:model.layers.1"], False),
    ("model.layers.1.q", ["model.layers.1"], False),  # plain entries are whole names
    ("model.layers.0.self_attn.q_proj", ["model.layers.0.self_attn.q_proj"], True),
    ("anything", [], False),
])
def test_matches_ignore(name, ignore, expected):
    assert ct.matches_ignore(name, ignore) is expected


def test_compress_linear_nvfp4_entries():
    weight = torch.randn(32, 64)
    tensors = ct.compress_linear("model.layers.0.mlp.down_proj", weight, "nvfp4", input_amax=torch.tensor([3.5]))
    prefix = "model.layers.0.mlp.down_proj"
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == {
        f"{prefix}.weight_packed": (torch.uint8, (32, 32)),
        f"{prefix}.weight_scale": (torch.float8_e4m3fn, (32, 4)),
        f"{prefix}.weight_global_scale": (torch.float32, (1,)),
        f"{prefix}.input_global_scale": (torch.float32, (1,)),
    }
    global_scale = weight.abs().amax().reshape(1).reciprocal() * 2688.0  # float32, compressed-tensors' order
    assert torch.equal(tensors[f"{prefix}.weight_global_scale"], global_scale)
    assert torch.equal(tensors[f"{prefix}.input_global_scale"], torch.tensor([3.5]).reciprocal() * 2688.0)
    decompressed = ct.decompress_linear(tensors, prefix, "nvfp4")
    assert torch.equal(decompressed, nvfp4.quantize_dequantize(weight, global_scale))
    assert "m.input_global_scale" not in ct.compress_linear("m", weight, "nvfp4")


def test_compress_linear_fp8_entries():
    weight = torch.randn(48, 32)
    tensors = ct.compress_linear("m", weight, ct.parse_quantization_config(MINIMAL_FP8_DYNAMIC))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == {
        "m.weight": (torch.float8_e4m3fn, (48, 32)),
        "m.weight_scale": (torch.float32, (48, 1)),
    }
    assert torch.equal(ct.decompress_linear(tensors, "m", "fp8"), fp8.dequantize_rowwise(*fp8.quantize_rowwise(weight)))
    per_tensor = {"m.weight": tensors["m.weight"], "m.weight_scale": torch.tensor([0.5])}
    assert torch.equal(ct.decompress_linear(per_tensor, "m", "fp8"), tensors["m.weight"].float() * 0.5)


def test_compress_rejects_layouts_it_does_not_write():
    tensor_strategy = ct.parse_quantization_config(_edited(MINIMAL_FP8_DYNAMIC, W + ("strategy",), "tensor"))
    with pytest.raises(ValueError, match="per channel"):
        ct.compress_linear("m", torch.randn(16, 16), tensor_strategy)
    with pytest.raises(ValueError, match="K=24"):
        ct.compress_linear("m", torch.randn(16, 24), "nvfp4")


def test_compress_linear_group_shares_one_global_scale():
    names = ["q_proj", "k_proj", "v_proj"]
    weights = [torch.randn(64, 32), torch.randn(16, 32) * 4, torch.randn(16, 32) * 0.1]
    tensors = ct.compress_linear_group(names, weights, "nvfp4", input_amax=torch.tensor([2.0]))
    joint_gs = nvfp4.global_scale_from_amax(weights[1].abs().amax()).reshape(1)
    for name, weight in zip(names, weights):
        assert torch.equal(tensors[f"{name}.weight_global_scale"], joint_gs)
        packed, block_scale = nvfp4.quantize(weight, joint_gs)
        assert torch.equal(tensors[f"{name}.weight_packed"], packed)
        assert torch.equal(tensors[f"{name}.weight_scale"].view(torch.uint8), block_scale.view(torch.uint8))
        assert torch.equal(tensors[f"{name}.input_global_scale"], torch.tensor([0.5 * 2688.0]))
    alone = ct.compress_linear("v_proj", weights[2], "nvfp4")
    assert not torch.equal(alone["v_proj.weight_global_scale"], joint_gs)


# ---- compressed-tensors itself as the reference -------------------------------------------------------------------

def _library():
    return pytest.importorskip("compressed_tensors")


def _library_nvfp4(weight: torch.Tensor) -> tuple[dict, object]:
    """Compress one Linear weight the way llm-compressor drives compressed-tensors for the NVFP4 preset."""
    _library()
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    scheme = preset_name_to_scheme("NVFP4", ["Linear"])
    global_scale = generate_gparam(weight.amin(), weight.amax())
    blocks = weight.unflatten(-1, (-1, 16))
    scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), scheme.weights, global_scale=global_scale)
    state = {"weight": weight, "weight_scale": scale, "weight_global_scale": global_scale}
    return NVFP4PackedCompressor.compress(state, scheme), scheme


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_is_byte_identical_to_compressed_tensors(dtype):
    torch.manual_seed(0)
    weight = (torch.randn(192, 256) * torch.logspace(-3, 0, 192).unsqueeze(1)).to(dtype)
    weight[7, 32:48] = 0.0
    weight[9, 5] = -0.0
    library, scheme = _library_nvfp4(weight)
    ours = ct.compress_linear("m", weight, "nvfp4")
    assert torch.equal(ours["m.weight_packed"], library["weight_packed"])
    assert torch.equal(ours["m.weight_scale"].view(torch.uint8), library["weight_scale"].view(torch.uint8))
    assert torch.equal(ours["m.weight_global_scale"], library["weight_global_scale"])

    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    decompressed = ct.decompress_linear(ours, "m", "nvfp4")
    library_weight = NVFP4PackedCompressor.decompress(dict(library), scheme)["weight"]  # bf16
    assert torch.equal(decompressed.to(library_weight.dtype), library_weight)
    unpacked = unpack_fp4_from_uint8(library["weight_packed"], 192, 256, dtype=torch.float32)
    library_fp32 = dequantize(unpacked, library["weight_scale"].float(), args=scheme.weights,
                              global_scale=library["weight_global_scale"], dtype=torch.float32)
    assert torch.equal(decompressed, library_fp32)


def test_nvfp4_fused_global_scale_and_input_scale_match_compressed_tensors():
    _library()
    from compressed_tensors.quantization.utils import generate_gparam

    weights = [torch.randn(32, 64).bfloat16(), (torch.randn(16, 64) * 3).bfloat16()]
    tensors = ct.compress_linear_group(["gate_proj", "up_proj"], weights, "nvfp4",
                                       input_amax=torch.tensor(7.25, dtype=torch.bfloat16))
    joint = torch.cat(weights)
    assert torch.equal(tensors["gate_proj.weight_global_scale"], generate_gparam(joint.amin(), joint.amax()))
    input_gs = generate_gparam(torch.tensor(-7.25, dtype=torch.bfloat16), torch.tensor(7.25, dtype=torch.bfloat16))
    assert torch.equal(tensors["up_proj.input_global_scale"], input_gs)


def test_fp8_is_byte_identical_to_compressed_tensors():
    _library()
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    weight = torch.randn(96, 128) * torch.logspace(-4, 2, 96).unsqueeze(1)
    weight[3] = 0.0
    scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    scale, _ = calculate_qparams(weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True), scheme.weights)
    library = FloatQuantizationCompressor.compress({"weight": weight, "weight_scale": scale}, scheme)
    ours = ct.compress_linear("m", weight, "fp8")
    assert torch.equal(ours["m.weight"].view(torch.uint8), library["weight"].view(torch.uint8))
    assert torch.equal(ours["m.weight_scale"], library["weight_scale"])
    decompressed = FloatQuantizationCompressor.decompress(dict(library), scheme)["weight"]
    assert torch.equal(ct.decompress_linear(ours, "m", "fp8"), decompressed)


@pytest.mark.parametrize("scheme,preset,format_", [("nvfp4", "NVFP4", ct.NVFP4_FORMAT),
                                                   ("fp8", "FP8_DYNAMIC", ct.FP8_FORMAT)])
def test_built_config_validates_with_compressed_tensors(scheme, preset, format_):
    _library()
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    config = QuantizationConfig.model_validate(ct.build_quantization_config(scheme, ["lm_head"]))
    group = config.config_groups["group_0"]
    reference = preset_name_to_scheme(preset, ["Linear"])
    for role in ("weights", "input_activations"):
        ours, theirs = getattr(group, role), getattr(reference, role)
        for field in ("num_bits", "type", "symmetric", "group_size", "strategy", "dynamic"):
            assert getattr(ours, field) == getattr(theirs, field), (role, field)
    assert config.format == format_ and config.quantization_status == "compressed" and config.ignore == ["lm_head"]
    compressor = BaseCompressor.get_value_from_registry(format_)
    assert compressor.can_compress(torch.nn.Linear, group)


@pytest.mark.parametrize("preset,name", [("NVFP4", "nvfp4"), ("NVFP4A16", "nvfp4"), ("FP8_DYNAMIC", "fp8")])
def test_parses_what_compressed_tensors_serializes_today(preset, name):
    _library()
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    format_ = ct.NVFP4_FORMAT if name == "nvfp4" else ct.FP8_FORMAT
    group = preset_name_to_scheme(preset, ["Linear"])
    group.format = format_
    library_config = QuantizationConfig(config_groups={"group_0": group}, format=format_,
                                        quantization_status="compressed", ignore=["lm_head"])
    scheme = ct.parse_quantization_config(library_config.model_dump(mode="json"))
    assert scheme.name == name and scheme.ignore == ["lm_head"]
    assert scheme.activations_quantized == (preset != "NVFP4A16")


@pytest.mark.parametrize("name", ["lm_head", "model.lm_head", "model.layers.3.mlp.gate", "model.layers.3.mlp.gate_proj",
                                  "model.layers.12.self_attn.k_proj", "model.layers.1.self_attn.k_proj"])
def test_ignore_matching_agrees_with_compressed_tensors(name):
    _library()
    from compressed_tensors.utils.match import match_name

    ignore = ["lm_head", "re:.*mlp.gate$", "re:model.layers.1.self_attn", "model.layers.12.self_attn.k_proj"]
    assert ct.matches_ignore(name, ignore) == any(match_name(name, entry) for entry in ignore)
