"""Engine configuration, and the one place where precision is decided.

The phase rule: prompt tokens run through the prefill precision, every token the model emits is computed by the
decode precision. The last prompt token counts as the first decode token (as in the paper's disaggregated pipeline,
whose decode server recomputes it), so the first output token comes from decode-precision logits.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

import torch

from mixquant.distributed.kv_transfer import KVTransferConfig

Precision = Literal["bf16", "fp8", "nvfp4"]
PRECISIONS: tuple[str, ...] = ("bf16", "fp8", "nvfp4")
# Attention of prefill segments with nothing cached before them: SDPA in the model dtype, the FP8 Triton kernel
# (mixquant/kernels/fp8_attention.py: per-tile scales) or cuDNN's FP8 flash attention
# (mixquant/kernels/cudnn_attention.py: per-tensor scales). Decode and cached-prefix segments always attend in the
# model dtype. "auto" picks cuDNN's where it is faster: fp8 prefill, segments of AUTO_FP8_ATTENTION_MIN_TOKENS or
# more (H200: 1.01x SDPA's speed at 4,096 tokens, 1.35x at 8,192, 1.63x at 131,072; docs/benchmarks.md). In the
# engine's fp8/bf16 prefill it lost at 6,144 tokens (0.97x) and won at 8,191 (1.04x: the prefill segment of an
# 8,192-token prompt, whose last token is a decode row), hence the threshold between them.
PREFILL_ATTENTIONS: tuple[str, ...] = ("auto", "bf16", "fp8", "fp8-cudnn")
AUTO_FP8_ATTENTION_MIN_TOKENS = 7168


class Phase(str, Enum):
    PREFILL = "prefill"
    DECODE = "decode"


def phase_boundary(num_prompt_tokens: int) -> int:
    """The first decode position: every prompt token but the last is prefill; the last and all generated are decode."""
    return num_prompt_tokens - 1


def phase_of_position(position: int, num_prompt_tokens: int) -> Phase:
    return Phase.PREFILL if position < phase_boundary(num_prompt_tokens) else Phase.DECODE


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but no CUDA GPU is available")
    return dev


def compute_capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def default_prefill_precision(device: torch.device) -> str:
    cap = compute_capability(device)
    if cap is None:
        return "bf16"
    if cap >= (10, 0):
        return "nvfp4"
    if cap >= (8, 9):
        return "fp8"
    return "bf16"


def fp8_cudnn_unavailable_reason(device: torch.device) -> str | None:
    """Why cuDNN's FP8 flash attention cannot run on `device` (None when it can)."""
    if importlib.util.find_spec("cudnn") is None:
        return "the cuDNN frontend is not installed (pip install 'mixquant[cudnn]')"
    cap = compute_capability(device)
    if cap is None:
        return f"it needs a CUDA GPU, not {device}"
    if cap < (9, 0):
        return f"it needs compute capability >= 9.0 (Hopper or newer); {device} has {cap[0]}.{cap[1]}"
    return None


def kernel_mode(precision: str, device: torch.device) -> Literal["native", "emulated"]:
    """Whether a precision runs on its own tensor-core path here, or as exact emulation (for accuracy studies)."""
    cap = compute_capability(device)
    if precision == "bf16":
        return "native"
    if precision == "fp8":
        return "native" if cap is not None and cap >= (8, 9) else "emulated"
    # FP4 tensor cores exist from Blackwell (sm100) on; Hopper and CPUs emulate NVFP4 exactly.
    return "native" if cap is not None and cap >= (10, 0) and hasattr(torch, "float4_e2m1fn_x2") else "emulated"


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' is the checkpoint's 16-bit dtype on GPU and float32 on CPU (CPU half-precision matmuls are slow)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "half": torch.float16,
             "fp16": torch.float16, "float32": torch.float32, "float": torch.float32, "fp32": torch.float32}
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return checkpoint_dtype if checkpoint_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    if dtype not in names:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of: auto, {', '.join(sorted(names))}")
    return names[dtype]


def prequantized_scheme(model: str, revision: str | None = None) -> str:
    """'nvfp4' or 'fp8': what a compressed-tensors checkpoint holds."""
    import json

    from mixquant.quantization.compressed_tensors import parse_quantization_config
    from mixquant.utils.hf import resolve_model_path

    config = json.loads((resolve_model_path(model, revision) / "config.json").read_text())
    if "quantization_config" not in config:
        raise ValueError(f"prefill_model {model!r} has no quantization_config: it is not a compressed-tensors "
                         "checkpoint (mixquant quantize writes one)")
    return parse_quantization_config(config["quantization_config"]).name


@dataclass
class EngineConfig:
    model: str
    tokenizer: str | None = None
    prefill_model: str | None = None
    prefill_precision: str = "auto"
    decode_precision: str = "bf16"
    dtype: str | torch.dtype = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None  # KV budget on CPU (default 2 GiB), or an exact budget on GPU
    num_kv_blocks: int | None = None  # overrides the sizing (tests use it to force preemption)
    enable_prefix_caching: bool = True
    hf_overrides: dict | None = None
    unquantized_layers: list[str] = field(default_factory=list)  # kept in the model dtype in every phase
    enforce_eager: bool = False
    skip_tokenizer_init: bool = False  # token ids in and out only (benchmarks of random-weight shapes)
    load_format: str = "auto"  # "dummy": random weights in the checkpoint's shapes (benchmarks)
    seed: int = 0
    revision: str | None = None
    prefill_attention: str = "auto"  # see PREFILL_ATTENTIONS; "auto" is resolved in __post_init__
    # Models with recurrent layers (Qwen3.5): a prefix-cache hit resumes only where a state snapshot was saved: at
    # the last whole block of each prompt, where a request's KV hit ended (a shared prefix's end), and every
    # state_snapshot_interval prompt tokens if that is set (a multiple of block_size). Snapshot rows default to one
    # per sequence slot (max_num_seqs); engine/state_slots.py.
    state_snapshot_interval: int = 0
    num_state_snapshots: int | None = None
    kv_transfer_config: KVTransferConfig | None = None  # a disaggregated prefill or decode instance
    tensor_parallel_size: int = 1  # ranks (GPUs, or CPU processes) the model is split over, one process each

    def __post_init__(self):
        self.device_obj = resolve_device(self.device)
        if self.prefill_precision == "auto":
            self.prefill_precision = (prequantized_scheme(self.prefill_model, self.revision) if self.prefill_model
                                      else default_prefill_precision(self.device_obj))
        for name in ("prefill_precision", "decode_precision"):
            if getattr(self, name) not in PRECISIONS:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(PRECISIONS)}")
        if self.prefill_model and prequantized_scheme(self.prefill_model, self.revision) != self.prefill_precision:
            raise ValueError(f"prefill_model {self.prefill_model!r} holds "
                             f"{prequantized_scheme(self.prefill_model, self.revision)} weights but "
                             f"prefill_precision={self.prefill_precision!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.skip_tokenizer_init and self.tokenizer:
            raise ValueError("skip_tokenizer_init and tokenizer= exclude each other")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.state_snapshot_interval < 0 or self.state_snapshot_interval % self.block_size:
            raise ValueError(f"state_snapshot_interval must be a non-negative multiple of block_size "
                             f"({self.block_size}), got {self.state_snapshot_interval}")
        if self.num_state_snapshots is not None and self.num_state_snapshots < 0:
            raise ValueError(f"num_state_snapshots must be >= 0, got {self.num_state_snapshots}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.tensor_parallel_size > 1 and self.device_obj.type == "cuda":
            if self.device_obj.index is not None:
                raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} runs rank r on the r-th visible "
                                 f"GPU: pass device='cuda' (CUDA_VISIBLE_DEVICES picks the GPUs), not {self.device!r}")
            if torch.cuda.device_count() < self.tensor_parallel_size:
                raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} needs as many GPUs, "
                                 f"{torch.cuda.device_count()} are visible")
        if self.prefill_attention not in PREFILL_ATTENTIONS:
            raise ValueError(f"prefill_attention={self.prefill_attention!r} is not one of "
                             f"{', '.join(PREFILL_ATTENTIONS)}")
        if self.prefill_attention == "fp8":
            cap = compute_capability(self.device_obj)
            if cap is None or cap < (8, 9):
                where = f"compute capability {cap[0]}.{cap[1]}" if cap else "no CUDA device"
                raise ValueError(f"prefill_attention='fp8' needs a CUDA GPU of compute capability >= 8.9 (FP8 "
                                 f"tensor cores: Ada, Hopper or newer); device {self.device_obj} has {where}")
        if self.prefill_attention == "fp8-cudnn":
            reason = fp8_cudnn_unavailable_reason(self.device_obj)
            if reason:
                raise ValueError(f"prefill_attention='fp8-cudnn' cannot run: {reason}")
        # fresh prefill segments shorter than this attend in the model dtype whatever prefill_attention says
        self.fp8_attention_min_tokens = 0
        self.prefill_attention_requested = self.prefill_attention
        # why "auto" left FP8 attention off on a GPU that has FP8 tensor cores (the start line says it)
        self.fp8_attention_missing: str | None = None
        if self.prefill_attention == "auto":
            missing = fp8_cudnn_unavailable_reason(self.device_obj)
            fast = self.prefill_precision == "fp8" and missing is None
            self.prefill_attention = "fp8-cudnn" if fast else "bf16"
            self.fp8_attention_min_tokens = AUTO_FP8_ATTENTION_MIN_TOKENS if fast else 0
            cap = compute_capability(self.device_obj)
            if self.prefill_precision == "fp8" and missing and cap is not None and cap >= (9, 0):
                self.fp8_attention_missing = missing

    def fp8_attention_unsupported(self, why: str):
        """The model's attention layers cannot take the FP8 prefill kernels (the runner knows them): an explicit
        FP8 choice is refused, 'auto' attends in the model dtype."""
        if self.prefill_attention_requested != "auto":
            raise ValueError(f"prefill_attention={self.prefill_attention!r} cannot run: {why}")
        self.prefill_attention, self.fp8_attention_min_tokens = "bf16", 0
        self.fp8_attention_missing = None  # no package would turn it on for this model: the start line says nothing

    @property
    def prefill_only(self) -> bool:
        """A disaggregated prefill instance (kv_role kv_producer): it never computes a decode row, so it has no
        decode weights."""
        return self.kv_transfer_config is not None and self.kv_transfer_config.kv_role == "kv_producer"

    @property
    def checkpoint(self) -> str:
        """Where the weights, config.json and tokenizer come from: a prefill-only engine given a pre-quantized
        prefill checkpoint loads that alone (no model-dtype copy of its quantized layers)."""
        return self.prefill_model if self.prefill_only and self.prefill_model else self.model

    def precision(self, phase: Phase) -> str:
        return self.prefill_precision if phase is Phase.PREFILL else self.decode_precision

    def describe_precisions(self) -> dict[str, str | None]:
        """What a server reports: both precisions and whether NVFP4 is native or emulated on this device."""
        uses_nvfp4 = "nvfp4" in (self.prefill_precision, self.decode_precision)
        return {
            "prefill_precision": self.prefill_precision,
            "decode_precision": self.decode_precision,
            "prefill_kernels": kernel_mode(self.prefill_precision, self.device_obj),
            "decode_kernels": kernel_mode(self.decode_precision, self.device_obj),
            "nvfp4": kernel_mode("nvfp4", self.device_obj) if uses_nvfp4 else None,
        }
