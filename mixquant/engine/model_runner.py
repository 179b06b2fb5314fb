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
from dataclasses import dataclass

import numpy as np
import torch

from mixquant.config import EngineConfig, Phase, phase_boundary
from mixquant.distributed.parallel_state import min_over_ranks
from mixquant.engine.kv_cache import KVCacheLayout
from mixquant.engine.prefill_graphs import PrefillGraphs, prefill_buckets
from mixquant.engine.scheduler import ScheduledBatch
from mixquant.engine.sequence import Sequence
from mixquant.engine.state_slots import StatePool
from mixquant.layers.attention import first_window_block
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


def rows_positions_and_slots(starts: list[int], ends: list[int], blocks, block_size: int
                             ) -> tuple[np.ndarray, np.ndarray]:
    """The positions and KV-cache slots of a step's rows, segment after segment, with no Python loop over rows (a
    long prompt's 8k rows cost milliseconds that way, with the GPU idle). `blocks` holds, segment after segment,
    the block-table entries each segment's rows fall in: table[start // block_size:(end - 1) // block_size + 1];
    entries of several units each (a sliding-window block's, one per cache group) give slots [rows, units]."""
    start, end = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    lengths = end - start
    first_row = np.cumsum(lengths) - lengths
    num_blocks = (end - 1) // block_size - start // block_size + 1
    first_block = np.cumsum(num_blocks) - num_blocks  # where each segment's entries begin in `blocks`
    positions = np.arange(lengths.sum()) + np.repeat(start - first_row, lengths)
    block_index = np.repeat(first_block - start // block_size, lengths) + positions // block_size
    units = np.asarray(blocks, dtype=np.int64)[block_index]
    return positions, units * block_size + (positions % block_size).reshape(-1, *[1] * (units.ndim - 1))


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, dtype: torch.dtype, max_model_len: int):
        self.config, self.hf_config, self.dtype = config, hf_config, dtype
        self.device = config.device_obj
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.model = loader.build_model(hf_config, dtype, self.device, max_model_len)
        self.kv_layout = KVCacheLayout(self.model.attention_layers(), self.block_size, dtype)
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
        """The FP8 prefill kernels' limits (both take head_dim 64 or 128, full causal attention), said at startup
        rather than at the first long prompt. Where "auto" chose them, a model outside the limits attends in the
        model dtype instead (EngineConfig.fp8_attention_unsupported)."""
        from mixquant.kernels.fp8_attention import HEAD_DIMS

        misfits = sorted({(layer.head_dim, layer.window) for layer in self.model.attention_layers()
                          if layer.head_dim not in HEAD_DIMS or layer.window is not None}, key=str)
        if not misfits and self.dtype in (torch.bfloat16, torch.float16):
            return
        why = (f"it needs head_dim in {HEAD_DIMS}, no sliding window and a 16-bit dtype; this model has "
               f"(head_dim, window) {misfits or 'fine'}, dtype {self.dtype}")
        self.config.fp8_attention_unsupported(why)
        logger.info("prefill attention in the model dtype: %s", why)

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
        """Bytes of one unit of the KV pool (a block of every layer, in a model without sliding windows)."""
        return self.kv_layout.unit_bytes

    def _allocate_kv_cache(self) -> int:
        per_block = self.kv_bytes_per_block()
        useful = self.config.max_num_seqs * self.kv_layout.peak_units(
            self.max_model_len, self.config.max_num_batched_tokens) + 1
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
        self.kv_cache = self.kv_layout.bind(num_blocks + 1, self.device)
        logger.info("KV cache: %d units; %s", num_blocks, self.kv_layout.describe())
        return num_blocks

    def _gpu_kv_budget(self) -> int:
        """What is left of gpu_memory_utilization after the weights and the activations of the largest step."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        probe_tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        scratch = self.kv_layout.bind(-(-probe_tokens // self.block_size), self.device)
        self._probe_forward(probe_tokens)
        peak = torch.cuda.max_memory_allocated(self.device) - scratch.numel() * scratch.element_size()
        self.kv_layout.unbind()
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
        table = torch.arange(-(-num_tokens // self.block_size), device=self.device)

        def probe_context() -> ForwardContext:  # every group's rows write and read the same scratch units
            return ForwardContext(num_prefill_rows=num_tokens, slot_mapping=positions,
                                  segments=[AttentionSegment(0, num_tokens, 0, table)], state=state,
                                  **self._prefill_attention())

        ctx = probe_context()
        ctx.kv_groups = [probe_context() for _ in self.kv_layout.groups[1:]]
        with torch.inference_mode(), forward_context(ctx):
            hidden = self.model(ids, positions)
            self.model.compute_logits(hidden[-self.config.max_num_seqs:])
        torch.cuda.synchronize()

    def kv_cache_tensors(self) -> list[torch.Tensor]:
        """The tensors that hold the KV cache, as a KV connector registers them with its transport: the pool."""
        return [self.kv_cache]

    def kv_block_planes(self) -> list[torch.Tensor]:
        """Views [blocks, ...] into kv_cache_tensors() in which each block is one contiguous run of bytes (K, then V,
        of each layer): a KV connector moves a block as one run per plane, the same block id in every plane. A unit
        of the pool holds a block of every layer in one run, so the pool is the one plane (a model with one cache
        group: check_block_transfer)."""
        return [self.kv_cache]

    def check_block_transfer(self):
        """read_kv_blocks / write_kv_blocks move one cache group's blocks: models with sliding-window layers have
        more."""
        if len(self.kv_layout.groups) > 1:
            raise ValueError("moving a request's KV block by block needs one cache group; this model's sliding-window "
                             "layers keep theirs in other units (engine/kv_cache.py, KVCacheLayout.tensors)")

    def _blocks_view(self) -> torch.Tensor:
        """The pool as [2, layers, units, block_size, kv_heads, head_dim], for a model with one cache group."""
        self.check_block_transfer()
        group = self.kv_layout.groups[0]
        shape = (self.kv_cache.shape[0], len(group.layers), 2, self.block_size, group.num_kv_heads, group.head_dim)
        return self.kv_cache.view(shape).permute(2, 1, 0, 3, 4, 5)

    def read_kv_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """[2, layers, len(block_ids), block_size, kv_heads, head_dim]: a request's KV, for export."""
        return self._blocks_view()[:, :, torch.tensor(block_ids, device=self.device)].clone()

    def write_kv_blocks(self, block_ids: list[int], data: torch.Tensor):
        self._blocks_view()[:, :, torch.tensor(block_ids, device=self.device)] = data.to(self.device, self.dtype)

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
        if self.kv_layout.window_units:
            ctx.kv_groups = self._window_contexts(ordered, starts, ends, row_starts, tail, num_prefill, lens, dev)
        return StepInputs(torch.from_numpy(np.array(input_ids, dtype=np.int64)).to(dev),
                          torch.from_numpy(positions).to(dev), ctx, sample_rows, prompt_rows,
                          {phase: sum(seg.end - seg.start for segs in by_phase for seg in segs if seg.phase is phase)
                           for phase in Phase})

    def _window_contexts(self, ordered: list[Segment], starts: list[int], ends: list[int], row_starts: list[int],
                         tail: int, num_prefill: int, lens: torch.Tensor | None,
                         dev: torch.device) -> list[ForwardContext]:
        """The sliding-window cache groups' contexts for the same rows (engine/kv_cache.py): group j writes to and
        reads from unit j of each block of the sequences' window tables, from each row's window on."""
        bs, window, groups = self.block_size, self.kv_layout.window, self.kv_layout.window_units
        written = [units for seg in ordered for units in seg.seq.window_table[seg.start // bs:(seg.end - 1) // bs + 1]]
        slots = torch.from_numpy(rows_positions_and_slots(starts, ends, written, bs)[1].T.copy()).to(dev)
        spans = [seg.seq.window_table[first_window_block(seg.start, window, bs):(seg.end - 1) // bs + 1]
                 for seg in ordered[:tail]]
        tables = torch.from_numpy(np.array([units for span in spans for units in span],
                                           dtype=np.int64).reshape(-1, groups).T.copy()).to(dev)
        offsets = np.cumsum([0] + [len(span) for span in spans])
        decode_tables = self._window_decode_tables(ordered[tail:], dev) if lens is not None else None
        return [ForwardContext(num_prefill, slots[j],
                               segments=[AttentionSegment(row, row + seg.end - seg.start, seg.start,
                                                          tables[j, offsets[k]:offsets[k + 1]])
                                         for k, (row, seg) in enumerate(zip(row_starts[:tail], ordered[:tail]))]
                               or None,
                               block_tables=None if decode_tables is None else decode_tables[j], context_lens=lens,
                               **self._prefill_attention())
                for j in range(groups)]

    def _window_decode_tables(self, segments: list[Segment], device: torch.device) -> torch.Tensor:
        """[window groups, rows, width] int32: each decode row's window units, from its window's first block."""
        bs, window = self.block_size, self.kv_layout.window
        spans = [seg.seq.window_table[first_window_block(seg.start, window, bs):seg.start // bs + 1]
                 for seg in segments]
        tables = np.zeros((len(spans), max(len(span) for span in spans), self.kv_layout.window_units), dtype=np.int32)
        for row, span in enumerate(spans):
            tables[row, :len(span)] = span
        return torch.from_numpy(tables.transpose(2, 0, 1).copy()).to(device)

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
        hidden = self._prefill_forward(inputs.input_ids[:split], inputs.positions[:split], ctx.prefill_part(split))
        if split == rows:
            return hidden
        decode = ctx.decode_part(split)
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
        groups = self.kv_layout.window_units
        scratch_slot = self.scratch_block * self.block_size
        self.graph_inputs = {
            "input_ids": torch.zeros(max_rows, dtype=torch.long, device=dev),
            "positions": torch.zeros(max_rows, dtype=torch.long, device=dev),
            "slot_mapping": torch.full((max_rows,), scratch_slot, dtype=torch.long, device=dev),
            "block_tables": torch.full((max_rows, max_blocks), self.scratch_block, dtype=torch.int32, device=dev),
            "context_lens": torch.ones(max_rows, dtype=torch.int32, device=dev),
            # the sliding-window groups' slots and window-relative tables
            "window_slot_mapping": torch.full((groups, max_rows), scratch_slot, dtype=torch.long, device=dev),
            "window_block_tables": torch.full((groups, max_rows, self.kv_layout.window_table_width() if groups else 1),
                                              self.scratch_block, dtype=torch.int32, device=dev),
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
            ctx.kv_groups = [ForwardContext(0, g["window_slot_mapping"][j, :rows],
                                            block_tables=g["window_block_tables"][j, :rows],
                                            context_lens=g["context_lens"][:rows]) for j in range(groups)]
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
        for j, group in enumerate(ctx.kv_groups):
            g["window_slot_mapping"][j, :rows] = group.slot_mapping
            g["window_slot_mapping"][j, rows:size] = self.scratch_block * self.block_size
            g["window_block_tables"][j, :rows, :group.block_tables.shape[1]] = group.block_tables
            g["window_block_tables"][j, rows:size, 0] = self.scratch_block
        if ctx.state is not None:
            g["state_slots"][:rows] = ctx.state.slots
            g["state_slots"][rows:size] = self.state_pool.scratch_slot
            g["state_resume"][:rows] = ctx.state.resume
        self.graphs[size].replay()
        return self.graph_outputs[size][:rows]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        return self.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)])
