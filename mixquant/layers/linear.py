"""Layers whose rows run in the precision of their phase: Linear here, the experts of MoE layers in fused_moe.py.

A layer owns its weights in the model dtype (possibly several checkpoint shards fused, e.g. q/k/v) and, once
loaded, one method per phase (models/loader.py decides which). A step's rows are laid out [prefill rows | decode
rows] (see utils/context.py), so routing is a slice, not a gather.

Under tensor parallelism a layer holds its rank's part of the weights (vLLM's column- and row-parallel linears in
one class, see Linear); its methods are built from that part, so every precision shards alike.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from mixquant.distributed.parallel_state import get_tp_size, tensor_model_parallel_all_reduce, tp_partition
from mixquant.quantization.linear_methods import LinearMethod
from mixquant.utils.context import get_context

ParallelStyle = Literal["replicated", "column", "row"]


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
    """x @ W^T (+ bias) for W the checkpoint shards `shard_names` stacked by rows (`output_sizes`, the checkpoint's).

    parallel="column": each rank holds its rows of every shard, `replicas[i]` ranks the same rows of shard i (the K
    and V shards of fewer KV heads than ranks); the output stays split. parallel="row": each rank holds its columns
    of the input (its part of a column-parallel layer's output) and the ranks' outputs are summed, the bias added
    once, after the sum. "replicated": the whole layer on every rank. input_size and output_sizes hold the rank's
    part; total_input_size and total_output_sizes the checkpoint's."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, prefix: str,
                 shard_names: list[str] | None = None, parallel: ParallelStyle = "replicated",
                 replicas: list[int] | None = None):
        super().__init__()
        self.prefix, self.parallel = prefix, parallel
        # Checkpoint names of the shards fused here; a plain layer is its own single shard.
        self.shard_names = shard_names or [prefix.rsplit(".", 1)[-1]]
        assert len(self.shard_names) == len(output_sizes)
        self.total_input_size, self.total_output_sizes = input_size, list(output_sizes)
        replicas = replicas or [1] * len(output_sizes)
        self.output_parts = [tp_partition(size, f"{prefix}: the rows of {name}", r) if parallel == "column"
                             else slice(0, size) for size, name, r in zip(output_sizes, self.shard_names, replicas)]
        self.input_part = (tp_partition(input_size, f"{prefix}: the input columns") if parallel == "row"
                           else slice(0, input_size))
        self.output_sizes = [part.stop - part.start for part in self.output_parts]
        self.input_size = self.input_part.stop - self.input_part.start
        self.input_is_parallel = parallel == "row" and get_tp_size() > 1
        out = sum(self.output_sizes)
        self.weight = nn.Parameter(torch.empty(out, self.input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out), requires_grad=False) if bias else None

    @property
    def method_bias(self) -> torch.Tensor | None:
        """The bias the methods add in their epilogue: none where the ranks' outputs are summed (it is added once,
        after the sum)."""
        return None if self.input_is_parallel else self.bias

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
        """Copies this rank's part of a checkpoint tensor (a torch tensor or a checkpoint slice, read here)."""
        param = getattr(self, param_name)
        expected = (self.total_output_sizes[shard], self.total_input_size)[:param.dim()]
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{self.prefix}: checkpoint tensor {self.shard_names[shard]}.{param_name} has shape "
                             f"{tuple(tensor.shape)}, the model expects {expected}")
        start, end = self.shard_offsets[shard], self.shard_offsets[shard + 1]
        param.data[start:end].copy_(self.shard_part(shard, tensor, has_input_dim=param.dim() == 2))

    def shard_part(self, shard: int, tensor: torch.Tensor, has_input_dim: bool) -> torch.Tensor:
        """This rank's part of a checkpoint tensor of shard `shard`: its rows where the tensor has one per output row,
        its columns where the tensor has an input dim (a weight; NVFP4's packed bytes and block scales, which split
        with it: the loader checks that blocks stay whole). Per-tensor scales come whole."""
        if not tensor.shape:
            return tensor[...]
        rows = self.output_parts[shard] if tensor.shape[0] == self.total_output_sizes[shard] else slice(None)
        if not has_input_dim:
            return tensor[rows]
        columns = (tp_partition(tensor.shape[-1], f"{self.prefix}: the columns of {self.shard_names[shard]}")
                   if self.parallel == "row" else slice(None))
        return tensor[rows, columns]

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
        out = self.route(sum(self.output_sizes), x, activation=activation)
        if not self.input_is_parallel:
            return out
        out = tensor_model_parallel_all_reduce(out)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        parallel = "" if self.parallel == "replicated" else f", {self.parallel}-parallel"
        return (f"in={self.input_size}, out={self.output_sizes}{parallel}, prefill={self.prefill_method}, "
                f"decode={self.decode_method}")
