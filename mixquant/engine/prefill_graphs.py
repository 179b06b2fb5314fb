"""Piecewise CUDA graphs for the prefill rows of a step: everything but attention, replayed without the host.

An eager forward issues some 1,500 launches whose Python cost (torch.compile's call wrappers above all) is 40-90 ms
on the device machines' hosts, more than the GPU needs for a 2k-token prefill: such steps waited on the host. Here
each stretch of the model between two attentions (a layer's o_proj, MLP, the next layer's norm, QKV, QK-norm and
RoPE) is one graph per padded row count, and attention, whose shapes follow the batch's sequences, runs eagerly
between them. The graphs of a row count pass their tensors through static buffers, so all row counts share the
buffers (sized for the largest) and one memory pool.

Only prefill rows go through here (all in prefill precision); a step's decode rows replay the decode graphs after
it (model_runner.py). Without CUDA (tests) the same pieces run eagerly through the same buffers and padding.
"""
from __future__ import annotations

import torch

from mixquant.utils.context import ForwardContext, forward_context

# Beyond this many prefill rows the GPU's work hides the host's. On an H200 (docs/benchmarks.md) graphs against eager
# were 2% slower at 8,192 rows in both bf16/bf16 and fp8/bf16 (the static buffers' copies); at 4,096 rows 4% slower
# in bf16/bf16 and 1.48x faster in fp8/bf16; at 2,048 1.07x and 2.69x faster.
MAX_GRAPH_ROWS = 4096


def prefill_buckets(max_rows: int) -> list[int]:
    """Padded row counts. From 1,024 rows on a step pads by at most 1/8 of its rows; below, reading the weights
    costs more than the rows do, so padding is nearly free."""
    steps = [*range(16, 128, 16), *range(128, 2048, 128), *range(2048, MAX_GRAPH_ROWS + 1, 256)]
    return [n for n in steps if n <= max_rows] or [max_rows]


class PrefillGraphs:
    def __init__(self, model, buckets: list[int], scratch_slot: int, device: torch.device, dtype: torch.dtype,
                 capture: bool):
        self.model, self.buckets, self.scratch_slot = model, sorted(buckets), scratch_slot
        self.layers = model.model.layers
        attns = [layer.self_attn for layer in self.layers]
        n, hidden = self.buckets[-1], model.config.hidden_size

        def buffer(*shape, dtype=dtype):
            return torch.zeros(n, *shape, dtype=dtype, device=device)

        self.input_ids, self.positions = buffer(dtype=torch.long), buffer(dtype=torch.long)
        # wide enough for the widest layer: a layer of another geometry (Gemma 4's two) uses the leading columns
        q_width = max(a.num_heads * a.head_dim for a in attns)
        kv_width = max(a.num_kv_heads * a.head_dim for a in attns)
        self.q, self.attn_out, self.k, self.v = buffer(q_width), buffer(q_width), buffer(kv_width), buffer(kv_width)
        self.residual, self.hidden = buffer(hidden), buffer(hidden)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        if capture:
            self._capture_all()

    @staticmethod
    def unsupported_reason(model) -> str | None:
        """Why these pieces cannot cover `model`, if they cannot: each stretch between two attentions is a piece, so
        every layer must split around its attention (DecoderLayer.before_attention / after_attention). Qwen3.5's
        Gated DeltaNet layers have no attention; their conv and state update, whose work follows the batch's
        sequences as attention's does, would have to run eagerly between pieces too."""
        layers = [layer for layer in model.model.layers if not hasattr(layer, "before_attention")]
        if layers:
            return (f"{len(layers)} of {len(model.model.layers)} layers are not split around an attention "
                    f"({type(layers[0]).__name__}); their prefill runs eagerly")
        return None

    def bucket(self, rows: int) -> int | None:
        return next((b for b in self.buckets if b >= rows), None)

    # ---- the pieces ---------------------------------------------------------------------------------------------

    def _heads(self, buffer: torch.Tensor, n: int, heads: int, head_dim: int) -> torch.Tensor:
        """The first n rows of a static buffer as one layer's [n, heads, head_dim]."""
        return buffer[:n, :heads * head_dim].view(n, heads, head_dim)

    def _piece(self, index: int, n: int):
        """Piece i runs layer i-1 after its attention (from attn_out) and layer i up to its attention."""
        positions = self.positions[:n]
        if index == 0:
            x, residual = self.model.model.embed_tokens(self.input_ids[:n]), None
        else:
            before = self.layers[index - 1].self_attn
            attn_out = self._heads(self.attn_out, n, before.num_heads, before.head_dim)
            x, residual = self.layers[index - 1].after_attention(attn_out, self.residual[:n])
            if index == len(self.layers):
                self.hidden[:n].copy_(self.model.model.final_norm(x, residual))
                return
        q, k, v, residual = self.layers[index].before_attention(positions, x, residual)
        attn = self.layers[index].self_attn
        self._heads(self.q, n, attn.num_heads, attn.head_dim).copy_(q)
        self._heads(self.k, n, attn.num_kv_heads, attn.head_dim).copy_(k)
        self._heads(self.v, n, attn.num_kv_heads, attn.head_dim).copy_(v)
        self.residual[:n].copy_(residual)

    def _run_piece(self, index: int, n: int):
        graphs = self.graphs.get(n)
        if graphs:
            graphs[index].replay()
        else:
            self._piece(index, n)

    def _capture_all(self):
        pool = None
        for n in reversed(self.buckets):  # the largest first: the pool it leaves fits every smaller one
            # the pieces read only num_prefill_rows (every row in prefill precision); slots are for attention
            ctx = ForwardContext(num_prefill_rows=n, slot_mapping=self.positions[:n])
            graphs = []
            with torch.inference_mode(), forward_context(ctx):
                for index in range(len(self.layers) + 1):
                    self._piece(index, n)  # warm-up outside the graph: compiles, allocates
                torch.cuda.synchronize()
                for index in range(len(self.layers) + 1):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool):
                        self._piece(index, n)
                    pool = graph.pool()
                    graphs.append(graph)
            self.graphs[n] = graphs
        torch.cuda.synchronize()

    # ---- a step ---------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states of the first ctx.num_prefill_rows rows (all prefill segments of the step)."""
        rows = ctx.num_prefill_rows
        n = self.bucket(rows)
        self.input_ids[:rows].copy_(input_ids[:rows])
        self.positions[:rows].copy_(positions[:rows])
        # padding rows write their K/V to the scratch slot and are in no attention segment; the decode tail replays
        # the decode graphs afterwards
        with forward_context(ctx.padded_prefill(n, self.scratch_slot)):
            self._run_piece(0, n)
            for index, layer in enumerate(self.layers):
                attn = layer.self_attn
                q = self._heads(self.q, n, attn.num_heads, attn.head_dim)
                k, v = (self._heads(b, n, attn.num_kv_heads, attn.head_dim) for b in (self.k, self.v))
                self._heads(self.attn_out, n, attn.num_heads, attn.head_dim).copy_(attn.attn(q, k, v))
                self._run_piece(index + 1, n)
        return self.hidden[:rows]
