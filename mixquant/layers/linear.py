"""Layers whose rows run in the precision of their phase: Linear here, the experts of MoE layers in fused_moe.py.

A layer owns its weights in the model dtype (possibly several checkpoint shards fused, e.g. q/k/v) and, once
loaded, one method per phase (models/loader.py decides which). A step's rows are laid out [prefill rows | decode
rows] (see utils/context.py), so routing is a slice, not a gather.
"""
from __future__ import annotations

import torch
from torch import nn

from mixquant.quantization.linear_methods import LinearMethod
from mixquant.utils.context import get_context


class PhaseRouted(nn.Module):
    """A layer computed by `prefill_method` for the step's prefill rows and by `decode_method` for its decode rows."""

    prefix: str

    def __init__(self):
        super().__init__()
        self.prefill_method = self.decode_method = None

    def set_methods(self, prefill, decode):
        self.prefill_method, self.decode_method = prefill, decode

    def route(self, out_features: int, *rows: torch.Tensor, **kwargs) -> torch.Tensor:
        """Each method on its rows of every tensor in `rows` (row-aligned inputs), writing its rows of one output:
        no concatenation pass."""
        split, n = get_context().num_prefill_rows, rows[0].shape[0]
        if self.prefill_method is self.decode_method or split == 0:
            return self.decode_method(*rows, **kwargs)
        if split == n:
            return self.prefill_method(*rows, **kwargs)
        out = torch.empty(n, out_features, dtype=rows[0].dtype, device=rows[0].device)
        self.prefill_method(*(r[:split] for r in rows), out=out[:split], **kwargs)
        self.decode_method(*(r[split:] for r in rows), out=out[split:], **kwargs)
        return out


class Linear(PhaseRouted):
    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, prefix: str,
                 shard_names: list[str] | None = None):
        super().__init__()
        self.prefix = prefix
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        # Checkpoint names of the shards fused here; a plain layer is its own single shard.
        self.shard_names = shard_names or [prefix.rsplit(".", 1)[-1]]
        assert len(self.shard_names) == len(self.output_sizes)
        out = sum(output_sizes)
        self.weight = nn.Parameter(torch.empty(out, input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out), requires_grad=False) if bias else None

    @property
    def shard_offsets(self) -> list[int]:
        offsets = [0]
        for size in self.output_sizes:
            offsets.append(offsets[-1] + size)
        return offsets

    def shard_module_names(self) -> list[str]:
        parent = self.prefix.rsplit(".", 1)[0]
        return [f"{parent}.{name}" for name in self.shard_names]

    def load_shard(self, param_name: str, tensor: torch.Tensor, shard: int):
        param = getattr(self, param_name)
        start, end = self.shard_offsets[shard], self.shard_offsets[shard + 1]
        if tensor.shape[0] != end - start or (param.dim() == 2 and tensor.shape[1] != self.input_size):
            raise ValueError(
                f"{self.prefix}: checkpoint tensor {self.shard_names[shard]}.{param_name} has shape "
                f"{tuple(tensor.shape)}, the model expects {(end - start, *param.shape[1:])}"
            )
        param.data[start:end].copy_(tensor)

    def set_methods(self, prefill: LinearMethod, decode: LinearMethod):
        super().set_methods(prefill, decode)
        if not (prefill.uses_model_weight or decode.uses_model_weight):
            self.weight = None  # neither phase reads the model-dtype copy: give its memory back

    def takes_quantized_rows(self, rows: int) -> bool:
        """Whether this step's input of `rows` rows may come as fp8.QuantizedRows: one method computes all of them
        (see forward) and takes rows its producer has quantized."""
        split = get_context().num_prefill_rows
        method = self.decode_method if split == 0 else self.prefill_method if split == rows else None
        return method is not None and method.takes_quantized_rows

    def forward(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        """activation: x is [gate | up] and this layer's input act(gate) * up (see LinearMethod.__call__)."""
        return self.route(sum(self.output_sizes), x, activation=activation)

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_sizes}, prefill={self.prefill_method}, "
                f"decode={self.decode_method}")
