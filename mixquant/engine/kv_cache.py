"""Where attention layers keep their K/V: one pool of equal units, shared by layers of different geometries.

A model may have two kinds of attention layer: full layers, which keep every token's K/V, and sliding-window
layers (Gemma 4: window 1,024), which need only their window's. Their K/V per token may differ too (Gemma 4 31B:
full layers 4 KV heads of 512 dims, sliding ones 16 of 256). One pool of equal *units* holds both, so memory moves
freely between them as requests come and go, and a sliding block that leaves every window goes back to the pool:

- A unit holds `block_size` tokens of K and V for one *cache group* of layers. All full layers form one group of
  one unit, which sets the unit's size (so a model without windows has exactly one group, and a unit is a block of
  every layer, as in vLLM's single-spec case). Sliding layers are split into `window_units` groups of as many layers
  as a unit holds, so a sliding block takes that many units (Gemma 4 31B: 10 groups of 5 layers, no padding;
  26B-A4B: 13 groups of 2, where a unit has room for 2.5 sliding layers).
- Each group has its own block table per sequence: full layers use the sequence's `block_table`, sliding group j
  unit j of each entry of its `window_table` (engine/block_manager.py), read from the window's first block on.

Every layer's cache is a [units, block_size, kv_heads, head_dim] view into the pool: strided (a unit holds other
layers too), which the attention paths index by (unit, offset) rather than by flat slot.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mixquant.layers.attention import Attention


def peak_units(num_tokens: int, chunk: int, block_size: int, window: int | None, window_units: int) -> int:
    """The most units a sequence of num_tokens, computed in chunks of up to `chunk` tokens, holds at once: its
    full-layer blocks, and the sliding layers' blocks one chunk and the window before it reach."""
    blocks = -(-num_tokens // block_size)
    if not window_units:
        return blocks
    window_blocks = -(-(window - 1 + min(chunk, num_tokens)) // block_size) + 1
    return blocks + window_units * min(blocks, window_blocks)


def max_tokens(units: int, chunk: int, block_size: int, window: int | None, window_units: int) -> int:
    """The longest sequence `units` units hold (peak_units inverted): every unit a full-layer block, less the
    sliding layers' blocks within one chunk and the window before it."""
    if not window_units:
        return units * block_size
    window_blocks = -(-(window - 1 + chunk) // block_size) + 1
    if units >= (1 + window_units) * window_blocks:
        return (units - window_units * window_blocks) * block_size
    return units // (1 + window_units) * block_size


@dataclass
class KVCacheGroup:
    """Attention layers that share one block table: one kind (window), one geometry, one unit of each block."""

    window: int | None  # None: full attention
    unit: int  # which of its kind's units per block (always 0 for full layers)
    layers: list[Attention]

    @property
    def num_kv_heads(self) -> int:
        return self.layers[0].num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.layers[0].head_dim


@dataclass
class KVCacheTensor:
    """One layer's K and V cache as a connector reads them: [units, block_size, kv_heads, head_dim] views."""

    layer: Attention
    group: int
    key: torch.Tensor
    value: torch.Tensor


class KVCacheLayout:
    def __init__(self, layers: list[Attention], block_size: int, dtype: torch.dtype):
        self.block_size, self.dtype = block_size, dtype
        kinds: dict[int | None, list[Attention]] = {}
        for layer in layers:
            kinds.setdefault(layer.window, []).append(layer)
        full = kinds.pop(None, None)
        if not full:
            raise ValueError("models whose every attention layer has a sliding window are not supported")
        if len(kinds) > 1:
            raise ValueError(f"one sliding window per model is supported, this one has {sorted(kinds)}")
        for members in (full, *kinds.values()):
            geometries = {(m.num_kv_heads, m.head_dim) for m in members}
            if len(geometries) > 1:
                raise ValueError(f"attention layers of one kind must share a KV geometry, got {sorted(geometries)}")
        self.groups = [KVCacheGroup(None, 0, full)]
        self.unit_elements = len(full) * self._layer_elements(full[0])
        self.window, self.window_units = None, 0
        if kinds:
            [(self.window, sliding)] = kinds.items()
            per_layer = self._layer_elements(sliding[0])
            self.unit_elements = max(self.unit_elements, per_layer)  # a sliding layer larger than all full ones
            per_unit = self.unit_elements // per_layer
            self.groups += [KVCacheGroup(self.window, j, sliding[start:start + per_unit])
                            for j, start in enumerate(range(0, len(sliding), per_unit))]
            self.window_units = len(self.groups) - 1
        for index, group in enumerate(self.groups):
            for layer in group.layers:
                layer.kv_group = index
        self.pool: torch.Tensor | None = None

    def peak_units(self, num_tokens: int, chunk: int) -> int:
        return peak_units(num_tokens, chunk, self.block_size, self.window, self.window_units)

    def max_tokens(self, units: int, chunk: int) -> int:
        return max_tokens(units, chunk, self.block_size, self.window, self.window_units)

    def window_table_width(self) -> int:
        """The most blocks a decode row's window spans: its table width in a sliding group."""
        return -(-(self.window - 1) // self.block_size) + 1

    def _layer_elements(self, layer: Attention) -> int:
        """K and V of one layer for one block."""
        return 2 * self.block_size * layer.num_kv_heads * layer.head_dim

    @property
    def unit_bytes(self) -> int:
        return self.unit_elements * self.dtype.itemsize

    def bytes_per_token(self) -> dict[str, int]:
        """K/V bytes one token costs in the full layers and, within its window, in the sliding ones (as stored:
        a sliding block takes whole units)."""
        per_block = {"full": self.unit_bytes, "sliding": self.window_units * self.unit_bytes}
        return {kind: size // self.block_size for kind, size in per_block.items()}

    def padding_fraction(self) -> float:
        """The share of the units' bytes no layer uses (sliding layers that do not fill their last unit)."""
        used = sum(len(g.layers) * self._layer_elements(g.layers[0]) for g in self.groups)
        return 1 - used / (len(self.groups) * self.unit_elements)

    def bind(self, num_units: int, device: torch.device) -> torch.Tensor:
        """A zeroed pool of `num_units` units; every attention layer gets its K and V views into it."""
        self.pool = torch.zeros(num_units, self.unit_elements, dtype=self.dtype, device=device)
        for group in self.groups:
            shape = (num_units, len(group.layers), 2, self.block_size, group.num_kv_heads, group.head_dim)
            used = shape[1] * self._layer_elements(group.layers[0])
            views = self.pool[:, :used].view(shape)
            for slot, layer in enumerate(group.layers):
                layer.k_cache, layer.v_cache = views[:, slot, 0], views[:, slot, 1]
        return self.pool

    def unbind(self):
        for group in self.groups:
            for layer in group.layers:
                layer.k_cache = layer.v_cache = torch.empty(0)
        self.pool = None

    def tensors(self) -> list[KVCacheTensor]:
        """Every layer's K and V cache with its group (a connector's view of the cache; units are block ids of
        the group's table)."""
        return [KVCacheTensor(layer, index, layer.k_cache, layer.v_cache)
                for index, group in enumerate(self.groups) for layer in group.layers]

    def describe(self) -> str:
        per_token = self.bytes_per_token()
        text = (f"{len(self.groups[0].layers)} full-attention layers, {per_token['full'] / 1024:.1f} KiB a token "
                f"(a unit: {self.unit_bytes / 2**20:.2f} MiB, {self.block_size} tokens)")
        if self.window_units:
            sliding = sum(len(g.layers) for g in self.groups[1:])
            text += (f"; {sliding} sliding-window layers ({self.window} tokens), {per_token['sliding'] / 1024:.1f} KiB "
                     f"a token within the window ({self.window_units} units a block, "
                     f"{self.padding_fraction():.0%} of them padding)")
        return text
