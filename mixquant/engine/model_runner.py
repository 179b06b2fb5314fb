"""Owns the model and the KV cache on one device; turns a scheduled batch into one forward pass.

Each sequence's scheduled tokens are cut at its phase boundary (the last prompt token) into a prefill segment
and a decode segment, and the step's rows are laid out [all prefill segments | all decode segments]. Linear
layers route the two row ranges to their phase's method; attention sees one segment list either way. Models with
recurrent layers (Qwen3.5's Gated DeltaNet) also get the state slot of each segment's sequence (StateSegments) and
keep their state in a StatePool beside the KV cache.
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, replace

import numpy as np
import torch

from mixquant.config import EngineConfig, Phase, phase_boundary
from mixquant.distributed.parallel_state import min_over_ranks
from mixquant.engine.prefill_graphs import PrefillGraphs, prefill_buckets
from mixquant.engine.scheduler import ScheduledBatch
from mixquant.engine.sequence import Sequence
from mixquant.engine.state_slots import StatePool
from mixquant.models import loader
from mixquant.utils.context import AttentionSegment, ForwardContext, StateSegments, forward_context
from mixquant.utils.hf import iterate_slices, resolve_model_path

logger = logging.getLogger(__name__)


@dataclass
class Segment:
    seq: Sequence
    start: int  # first position
    end: int  # one past the last position
    phase: Phase

    @property
    def is_decode_token(self) -> bool:
        return self.phase is Phase.DECODE and self.end - self.start == 1


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    context: ForwardContext
    sample_rows: list[int]  # row of each sequence that yields its next token (-1: none this step)
    prompt_logprob_rows: dict[int, list[int]]  # seq index -> rows whose logits score prompt tokens
    rows_per_phase: dict[Phase, int]  # tokens of each phase by the phase rule, whatever the layout


def rows_positions_and_slots(starts: list[int], ends: list[int], blocks: list[int], block_size: int
                             ) -> tuple[np.ndarray, np.ndarray]:
    """The positions and KV-cache slots of a step's rows, segment after segment, with no Python loop over rows (a
    long prompt's 8k rows cost milliseconds that way, with the GPU idle). `blocks` holds, segment after segment,
    the block-table entries each segment's rows fall in: table[start // block_size:(end - 1) // block_size + 1]."""
    start, end = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    lengths = end - start
    first_row = np.cumsum(lengths) - lengths
    num_blocks = (end - 1) // block_size - start // block_size + 1
    first_block = np.cumsum(num_blocks) - num_blocks  # where each segment's entries begin in `blocks`
    positions = np.arange(lengths.sum()) + np.repeat(start - first_row, lengths)
    block_index = np.repeat(first_block - start // block_size, lengths) + positions // block_size
    return positions, np.asarray(blocks, dtype=np.int64)[block_index] * block_size + positions % block_size


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, dtype: torch.dtype, max_model_len: int):
        self.config, self.hf_config, self.dtype = config, hf_config, dtype
        self.device = config.device_obj
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.model = loader.build_model(hf_config, dtype, self.device, max_model_len)
        if config.prefill_attention != "bf16":
            self._check_fp8_prefill_attention()
        self.state_pool = self._allocate_state_pool()
        checkpoint = resolve_model_path(config.checkpoint, config.revision)
        prequantized = None
        if config.load_format == "dummy":
            loader.init_dummy_weights(self.model, config.seed)
        elif config.prefill_only and config.prefill_model:
            prequantized = loader.load_prefill_checkpoint(self.model, checkpoint, self.device)
        else:
            loader.load_weights(self.model, iterate_slices(checkpoint))
        if config.prefill_model and prequantized is None:
            prequantized = loader.read_prequantized(
                self.model, resolve_model_path(config.prefill_model, config.revision), self.device)
        loader.assign_methods(self.model, config, dtype, prequantized)
        # Where both phases compute alike (one precision, BF16 attention), the phase boundary changes no number.
        self.phases_alike = config.prefill_attention == "bf16" and all(
            layer.prefill_method is layer.decode_method for layer in self.model.phase_routed_layers())
        self.num_blocks = self._allocate_kv_cache()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.prefill_graphs: PrefillGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            try:
                self._capture_decode_graphs()
            except RuntimeError as e:  # an op that cannot be captured: run decode eagerly rather than not at all
                self.graphs = {}
                logger.warning("decode CUDA graphs disabled, capture failed: %s", e)
            unsupported = PrefillGraphs.unsupported_reason(self.model)
            if unsupported:
                logger.info("prefill CUDA graphs off: %s", unsupported)
            else:
                try:
                    self.prefill_graphs = PrefillGraphs(
                        self.model, prefill_buckets(config.max_num_batched_tokens),
                        self.scratch_block * self.block_size, self.device, dtype, capture=True)
                except RuntimeError as e:
                    self.prefill_graphs = None
                    logger.warning("prefill CUDA graphs disabled, capture failed: %s", e)

    def _check_fp8_prefill_attention(self):
        """The FP8 prefill kernels' limits (both take head_dim 64 or 128), said at startup rather than at the first
        long prompt. Where "auto" chose them, a model outside the limits attends in the model dtype instead."""
        from mixquant.kernels.fp8_attention import HEAD_DIMS

        head_dim = self.model.attention_layers()[0].head_dim
        if head_dim not in HEAD_DIMS or self.dtype not in (torch.bfloat16, torch.float16):
            if self.config.prefill_attention_requested == "auto":
                logger.info("prefill attention in the model dtype: the FP8 kernels take head_dim in %s, this model "
                            "has %d", HEAD_DIMS, head_dim)
                self.config.prefill_attention, self.config.fp8_attention_min_tokens = "bf16", 0
                return
            raise ValueError(f"prefill_attention={self.config.prefill_attention!r} needs head_dim in {HEAD_DIMS} and "
                             f"a 16-bit dtype; this model has head_dim {head_dim}, dtype {self.dtype}")

    def _prefill_attention(self) -> dict:
        """The ForwardContext fields that say which prefill segments attend in FP8 (EngineConfig decides)."""
        return dict(prefill_attention=self.config.prefill_attention,
                    fp8_attention_min_tokens=self.config.fp8_attention_min_tokens)

    # ---- recurrent state --------------------------------------------------------------------------------------

    def _allocate_state_pool(self) -> StatePool | None:
        """A state slot per sequence the scheduler may run, and prefix-cache snapshots, for the model's recurrent
        layers; allocated before the KV cache, which gets what memory is left."""
        layers = self.model.state_layers()
        if not layers:
            return None
        config = self.config
        snapshots = 0
        if config.enable_prefix_caching:
            snapshots = config.max_num_seqs if config.num_state_snapshots is None else config.num_state_snapshots
        pool = StatePool(layers, config.max_num_seqs, snapshots, self.dtype, self.device)
        logger.info("%d recurrent layers: %s; %s", len(layers), layers[0].kernel_path(self.device), pool.describe())
        return pool

    def _state_segments(self, segments: list[Segment], row_starts: list[int], rows: int) -> StateSegments | None:
        if self.state_pool is None:
            return None
        bounds = row_starts + [rows]
        return StateSegments(
            torch.tensor([seg.seq.state_slot for seg in segments], dtype=torch.long, device=self.device),
            torch.tensor([seg.start > 0 for seg in segments], device=self.device), bounds,
            torch.tensor(bounds, dtype=torch.long, device=self.device),
            sum(seg.phase is Phase.PREFILL for seg in segments))

    # ---- KV cache -------------------------------------------------------------------------------------------

    def kv_bytes_per_block(self) -> int:
        attn = self.model.attention_layers()[0]
        per_layer = 2 * self.block_size * attn.num_kv_heads * attn.head_dim * self.dtype.itemsize
        return per_layer * len(self.model.attention_layers())

    def _allocate_kv_cache(self) -> int:
        per_block = self.kv_bytes_per_block()
        useful = self.config.max_num_seqs * -(-self.max_model_len // self.block_size) + 1
        if self.config.num_kv_blocks is not None:
            num_blocks = self.config.num_kv_blocks
        elif self.config.kv_cache_memory_bytes is not None:
            num_blocks = min(self.config.kv_cache_memory_bytes // per_block, useful)
        elif self.device.type == "cuda":
            num_blocks = min(self._gpu_kv_budget() // per_block, useful)
        else:
            num_blocks = min((2 << 30) // per_block, useful)
        num_blocks = min_over_ranks(num_blocks)  # every rank holds its KV heads of the same blocks
        if num_blocks < 1:
            raise ValueError("no memory is left for the KV cache: lower max_num_batched_tokens or raise "
                             "gpu_memory_utilization / kv_cache_memory_bytes")
        # one block more than the block manager hands out: padded rows of captured decode graphs write there
        self.scratch_block = num_blocks
        self.kv_cache = self._bind_kv_cache(num_blocks + 1)
        return num_blocks

    def _bind_kv_cache(self, num_blocks: int) -> torch.Tensor:
        """[2, layers, blocks, block_size, kv_heads, head_dim], with each attention layer given its K and V views."""
        layers = self.model.attention_layers()
        shape = (2, len(layers), num_blocks, self.block_size, layers[0].num_kv_heads, layers[0].head_dim)
        cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = cache[0, i], cache[1, i]
        return cache

    def _gpu_kv_budget(self) -> int:
        """What is left of gpu_memory_utilization after the weights and the activations of the largest step."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        probe_tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        scratch = self._bind_kv_cache(-(-probe_tokens // self.block_size))
        self._probe_forward(probe_tokens)
        peak = torch.cuda.max_memory_allocated(self.device) - scratch.numel() * scratch.element_size()
        for layer in self.model.attention_layers():
            layer.k_cache = layer.v_cache = torch.empty(0)
        del scratch
        gc.collect()  # memory of engines dropped before this one is handed back only once they are collected
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        in_use_by_others = total - free - torch.cuda.memory_reserved(self.device)
        return int(total * self.config.gpu_memory_utilization - in_use_by_others - peak)

    def _probe_forward(self, num_tokens: int):
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = torch.arange(num_tokens, device=self.device)
        state = None
        if self.state_pool is not None:  # one fresh sequence in the first slot
            state = StateSegments(torch.zeros(1, dtype=torch.long, device=self.device),
                                  torch.zeros(1, dtype=torch.bool, device=self.device), [0, num_tokens],
                                  torch.tensor([0, num_tokens], device=self.device), 1)
        ctx = ForwardContext(num_prefill_rows=num_tokens, slot_mapping=positions,
                             segments=[AttentionSegment(0, num_tokens, 0, torch.arange(1, device=self.device))],
                             state=state, **self._prefill_attention())
        with torch.inference_mode(), forward_context(ctx):
            hidden = self.model(ids, positions)
            self.model.compute_logits(hidden[-self.config.max_num_seqs:])
        torch.cuda.synchronize()

    def kv_cache_tensors(self) -> list[torch.Tensor]:
        """The tensors that hold the KV cache, as a KV connector registers them with its transport."""
        return [self.kv_cache]

    def kv_block_planes(self) -> list[torch.Tensor]:
        """Views [blocks, ...] into kv_cache_tensors() in which each block is one contiguous run of bytes (K, then V,
        of each layer): a KV connector moves a block as one run per plane, the same block id in every plane."""
        return [self.kv_cache[kv, layer] for kv in range(2) for layer in range(self.kv_cache.shape[1])]

    def read_kv_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """[2, layers, len(block_ids), block_size, kv_heads, head_dim]: a request's KV, for export."""
        return self.kv_cache[:, :, torch.tensor(block_ids, device=self.device)].clone()

    def write_kv_blocks(self, block_ids: list[int], data: torch.Tensor):
        self.kv_cache[:, :, torch.tensor(block_ids, device=self.device)] = data.to(self.device, self.dtype)

    # ---- one step -----------------------------------------------------------------------------------------

    @staticmethod
    def split_by_phase(seq: Sequence, num_new: int) -> list[Segment]:
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
        boundary = phase_boundary(seq.num_prompt_tokens)
        segments = []
        if start < boundary:
            segments.append(Segment(seq, start, min(end, boundary), Phase.PREFILL))
        if end > boundary:
            segments.append(Segment(seq, max(start, boundary), end, Phase.DECODE))
        return segments

    def _layout(self, segments: list[Segment]) -> list[Segment]:
        """A sequence's segments in a step's layout: split at the phase boundary only where the phases differ."""
        if self.phases_alike and len(segments) == 2:
            # the last prompt token rides with the prompt's rows instead of costing a pass of its own (with prefill
            # CUDA graphs, a decode-graph replay: one more read of every weight)
            return [Segment(segments[0].seq, segments[0].start, segments[1].end, Phase.PREFILL)]
        return segments

    def prepare(self, batch: ScheduledBatch, device: torch.device | None = None) -> StepInputs:
        """The step's inputs on `device` (this runner's by default; the host where a tensor-parallel driver
        broadcasts them to the ranks)."""
        by_phase = [self.split_by_phase(s, n) for s, n in zip(batch.seqs, batch.num_new_tokens)]
        per_seq = [self._layout(segs) for segs in by_phase]
        ordered = [seg for segs in per_seq for seg in segs if seg.phase is Phase.PREFILL]
        ordered += [seg for segs in per_seq for seg in segs if seg.phase is Phase.DECODE]
        seq_index = {id(s): i for i, s in enumerate(batch.seqs)}
        bs = self.block_size
        input_ids, starts, ends, blocks = [], [], [], []
        sample_rows = [-1] * len(batch.seqs)
        prompt_rows: dict[int, list[int]] = {}
        row_starts = []
        row = 0
        for seg in ordered:
            seq, n = seg.seq, seg.end - seg.start
            table = seq.block_table
            input_ids += seq.token_ids[seg.start:seg.end]
            starts.append(seg.start)
            ends.append(seg.end)
            blocks += table[seg.start // bs:(seg.end - 1) // bs + 1]
            row_starts.append(row)
            i = seq_index[id(seq)]
            if seg.end == seq.num_tokens:
                sample_rows[i] = row + n - 1
            if seq.params.prompt_logprobs is not None:
                scoring = [row + p - seg.start for p in range(seg.start, min(seg.end, seq.num_prompt_tokens - 1))]
                prompt_rows.setdefault(i, []).extend(scoring)
            row += n
        num_prefill = sum(seg.end - seg.start for seg in ordered if seg.phase is Phase.PREFILL)
        dev = device or self.device
        positions, slots = rows_positions_and_slots(starts, ends, blocks, bs)
        slot_mapping = torch.from_numpy(slots).to(dev)
        # the trailing single-token decode segments attend in one paged-decode call (all of them, in a decode step)
        tail = len(ordered)
        while tail and ordered[tail - 1].is_decode_token:
            tail -= 1
        tables, lens = self._decode_tables(ordered[tail:], dev) if tail < len(ordered) else (None, None)
        segments = [AttentionSegment(start, start + seg.end - seg.start, seg.start,
                                     torch.tensor(seg.seq.block_table, device=dev))
                    for start, seg in zip(row_starts[:tail], ordered[:tail])]
        ctx = ForwardContext(num_prefill, slot_mapping, segments=segments or None, block_tables=tables,
                             context_lens=lens, state=self._state_segments(ordered, row_starts, row),
                             **self._prefill_attention())
        return StepInputs(torch.from_numpy(np.array(input_ids, dtype=np.int64)).to(dev),
                          torch.from_numpy(positions).to(dev), ctx, sample_rows, prompt_rows,
                          {phase: sum(seg.end - seg.start for segs in by_phase for seg in segs if seg.phase is phase)
                           for phase in Phase})

    @staticmethod
    def _decode_tables(segments: list[Segment], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables padded to one width, and context lengths, of single-token decode segments.

        int32, as the decode graphs' inputs: the paged decode kernel beside a prefill then runs the variant those
        graphs compiled at start-up, where int64 tables made Triton compile another in the middle of serving."""
        width = max(len(seg.seq.block_table) for seg in segments)
        tables = np.array([seg.seq.block_table + [0] * (width - len(seg.seq.block_table)) for seg in segments],
                          dtype=np.int32)
        lens = np.array([seg.end for seg in segments], dtype=np.int32)
        return torch.from_numpy(tables).to(device), torch.from_numpy(lens).to(device)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        ctx = inputs.context
        if ctx.decode_only:
            return self._decode_forward(inputs.input_ids, inputs.positions, ctx)
        split, rows = ctx.num_prefill_rows, inputs.input_ids.shape[0]
        if not self._decode_tail_apart(ctx, rows):
            with forward_context(ctx):
                return self.model(inputs.input_ids, inputs.positions)
        # the prefill rows alone, all in prefill precision (so the norms may hand FP8 rows to the projections), then
        # the decode rows, which read the K/V the prefill rows have just written
        prefill = replace(ctx, slot_mapping=ctx.slot_mapping[:split], block_tables=None, context_lens=None,
                          state=ctx.state.prefill() if ctx.state else None)
        hidden = self._prefill_forward(inputs.input_ids[:split], inputs.positions[:split], prefill)
        if split == rows:
            return hidden
        decode = ForwardContext(0, ctx.slot_mapping[split:], block_tables=ctx.block_tables,
                                context_lens=ctx.context_lens, state=ctx.state.decode() if ctx.state else None)
        return torch.cat([hidden, self._decode_forward(inputs.input_ids[split:], inputs.positions[split:], decode)])

    @staticmethod
    def _decode_tail_apart(ctx: ForwardContext, rows: int) -> bool:
        """Every prefill segment within the first num_prefill_rows rows and every decode row a single token of the
        batched tail: the layout prepare makes, in which the two kinds of rows can run one after the other."""
        split = ctx.num_prefill_rows
        return (split > 0 and all(seg.row_end <= split for seg in ctx.segments)
                and (split == rows or (ctx.context_lens is not None and ctx.context_lens.shape[0] == rows - split)))

    def _prefill_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.prefill_graphs is not None and self.prefill_graphs.bucket(ctx.num_prefill_rows) is not None:
            return self.prefill_graphs.forward(input_ids, positions, ctx)
        with forward_context(ctx):
            return self.model(input_ids, positions)

    def _decode_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.graphs and input_ids.shape[0] <= max(self.graphs):
            return self._replay(input_ids, positions, ctx)
        with forward_context(ctx):
            return self.model(input_ids, positions)

    # ---- CUDA graphs for decode steps ---------------------------------------------------------------------------

    def _capture_decode_graphs(self):
        """One graph per batch size; a decode step of b rows replays the smallest graph with >= b rows."""
        if self.config.prefill_only:  # it runs no decode step
            return
        max_rows = min(self.config.max_num_seqs, 256)
        sizes = sorted({1, 2, 4, 8, *range(16, max_rows + 1, 16), max_rows})
        dev = self.device
        max_blocks = -(-self.max_model_len // self.block_size)
        self.graph_inputs = {
            "input_ids": torch.zeros(max_rows, dtype=torch.long, device=dev),
            "positions": torch.zeros(max_rows, dtype=torch.long, device=dev),
            "slot_mapping": torch.full((max_rows,), self.scratch_block * self.block_size, dtype=torch.long,
                                       device=dev),
            "block_tables": torch.full((max_rows, max_blocks), self.scratch_block, dtype=torch.int32, device=dev),
            "context_lens": torch.ones(max_rows, dtype=torch.int32, device=dev),
        }
        if self.state_pool is not None:  # padded rows run in the scratch slot
            self.graph_inputs.update(
                state_slots=torch.full((max_rows,), self.state_pool.scratch_slot, dtype=torch.long, device=dev),
                state_resume=torch.zeros(max_rows, dtype=torch.bool, device=dev),
                state_bounds=torch.arange(max_rows + 1, device=dev))
        self.graph_outputs: dict[int, torch.Tensor] = {}
        pool = None
        for rows in reversed(sizes):
            g = self.graph_inputs
            state = None
            if self.state_pool is not None:  # one row per sequence, as in every decode-only step
                state = StateSegments(g["state_slots"][:rows], g["state_resume"][:rows], list(range(rows + 1)),
                                      g["state_bounds"][:rows + 1], 0)
            ctx = ForwardContext(0, g["slot_mapping"][:rows], block_tables=g["block_tables"][:rows],
                                 context_lens=g["context_lens"][:rows], state=state)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), forward_context(ctx):
                self.model(g["input_ids"][:rows], g["positions"][:rows])  # warm-up: compiles, allocates
                torch.cuda.synchronize()
                with torch.cuda.graph(graph, pool):
                    self.graph_outputs[rows] = self.model(g["input_ids"][:rows], g["positions"][:rows])
            pool = graph.pool()
            self.graphs[rows] = graph
        torch.cuda.synchronize()

    def _replay(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        rows = input_ids.shape[0]
        size = min(r for r in self.graphs if r >= rows)
        g = self.graph_inputs
        g["input_ids"][:rows] = input_ids
        g["positions"][:rows] = positions
        g["slot_mapping"][:rows] = ctx.slot_mapping
        g["slot_mapping"][rows:size] = self.scratch_block * self.block_size
        width = ctx.block_tables.shape[1]
        g["block_tables"][:rows, :width] = ctx.block_tables
        g["context_lens"][:rows] = ctx.context_lens
        g["context_lens"][rows:size] = 1
        g["block_tables"][rows:size, 0] = self.scratch_block
        if ctx.state is not None:
            g["state_slots"][:rows] = ctx.state.slots
            g["state_slots"][rows:size] = self.state_pool.scratch_slot
            g["state_resume"][:rows] = ctx.state.resume
        self.graphs[size].replay()
        return self.graph_outputs[size][:rows]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        return self.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)])
