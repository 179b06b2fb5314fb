"""Finding checkpoints (local folders or Hugging Face ids), reading their config and streaming their tensors."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def resolve_model_path(name_or_path: str, revision: str | None = None) -> Path:
    """A local folder as is; `mixquant-tiny`, the bundled model; otherwise a Hugging Face id, fetched through
    huggingface_hub (HF_HUB_OFFLINE honoured)."""
    from mixquant import tiny

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if name_or_path == tiny.NAME:
        return tiny.bundled_model_path()
    if path.exists():
        raise ValueError(f"model {name_or_path!r} is a file; pass the checkpoint's folder or a Hugging Face id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, revision=revision, allow_patterns=CHECKPOINT_PATTERNS))
    except Exception as e:  # offline, unknown repo, bad id: all mean the same thing to the user
        raise ValueError(
            f"model {name_or_path!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {e})"
        ) from e


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: Path, hf_overrides: dict | None = None):
    """config.json with `hf_overrides` merged in before the config object is built (as `vllm serve --hf-overrides`).

    A `rope_scaling` override on a checkpoint written in the newer `rope_parameters` layout is merged into
    `rope_parameters`, so `rope_theta` survives (YaRN on Qwen3: {"rope_scaling": {"rope_type": "yarn", ...}}).
    """
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"no config.json in {path}")
    raw = json.loads(config_file.read_text())
    overrides = dict(hf_overrides or {})
    if "rope_scaling" in overrides and "rope_parameters" in raw and "rope_parameters" not in overrides:
        overrides["rope_parameters"] = overrides.pop("rope_scaling")
    raw = _merge(raw, overrides)
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{config_file}: unknown model_type {model_type!r}")
    return decoder_config(CONFIG_MAPPING[model_type].from_dict(raw))


def decoder_config(config):
    """The config of the text decoder the engine runs: a multimodal checkpoint's text_config (Qwen3.5's, served
    text-only), which takes the checkpoint's architecture, dtype and embedding tying (transformers ties by the
    top-level value); any other config as it is."""
    text = config.get_text_config(decoder=True)
    if text is config:
        return config
    text.architectures = config.architectures
    text.tie_word_embeddings = config.tie_word_embeddings
    if getattr(text, "dtype", None) is None:
        text.dtype = getattr(config, "dtype", None)
    return text


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ValueError(f"{index} names shard files that are missing: {', '.join(missing)}")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {path}")
    return files


def iterate_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


class CheckpointSlice:
    """A checkpoint tensor that reads only what is indexed (`[rows, columns]`, `[...]` for all of it): a
    tensor-parallel rank narrows to its part before any byte is copied. Valid until the iteration moves on."""

    def __init__(self, handle):
        self._handle = handle
        self.shape = torch.Size(handle.get_shape())

    def __getitem__(self, index) -> torch.Tensor:
        return self._handle[index]


def iterate_slices(path: Path) -> Iterator[tuple[str, CheckpointSlice]]:
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, CheckpointSlice(f.get_slice(name))
