"""`mixquant bench prefill|decode`: engine speed per precision pair, side by side in one run.

Every row reports tokens/s next to achieved TFLOP/s (prefill) or GB/s (decode) and the ceilings measured in the
same run (a large BF16 matmul, a device-to-device copy), so a number can be read against what the card can do.
Times are medians of several repeats after warm-up, taken with CUDA events.
"""
from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mixquant.bench.shapes import experts_per_token, prefill_flops
from mixquant.config import EngineConfig
from mixquant.engine.llm_engine import LLMEngine
from mixquant.layers.fused_moe import GroupedExperts
from mixquant.layers.sampler import apply_token_bitmask
from mixquant.sampling_params import SamplingParams, StructuredOutputsParams
from mixquant.utils.hf import load_config


@dataclass
class Row:
    kind: str  # "prefill" | "decode"
    engine: str  # "mixquant" | "transformers"
    prefill_precision: str
    decode_precision: str
    context: int
    batch: int
    tokens_per_s: float
    time_s: float
    tflops: float | None = None
    gbps: float | None = None
    ratio_to_baseline: float | None = None
    prefill_attention: str = "auto"  # as asked for (EngineConfig.prefill_attention); notes say what "auto" became
    notes: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        attention = f" {self.prefill_attention}-attn" if self.prefill_attention not in ("auto", "bf16") else ""
        return f"{self.prefill_precision}/{self.decode_precision}{attention}"

    def to_dict(self) -> dict:
        return asdict(self)


def timed(fn: Callable[[], None], repeats: int, warmup: int = 1) -> float:
    """Median seconds of fn over repeats (CUDA events on GPU, a host clock otherwise)."""
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_ceilings() -> dict:
    """The card's BF16 matmul rate and copy bandwidth, measured now (random data, not zeros)."""
    if not torch.cuda.is_available():
        return {}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = timed(lambda: a @ b, 10, 3)
    src = torch.randn(2 << 28, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy = timed(lambda: dst.copy_(src), 10, 3)
    result = {"bf16_matmul_tflops": 2 * 8192**3 / mm / 1e12,
              "copy_gbps": 2 * src.numel() * src.element_size() / copy / 1e9}
    del a, b, src, dst
    torch.cuda.empty_cache()
    return result


def _engine(model: str, pair: str, max_len: int, batched_tokens: int, max_seqs: int, hf_overrides: dict | None,
            eager: bool, prefill_attention: str = "auto", tokenizer: str | None = None,
            tensor_parallel_size: int = 1) -> LLMEngine:
    """An engine with random weights; without a tokenizer unless one is named."""
    prefill, decode = pair.split("/")
    return LLMEngine(EngineConfig(model=model, load_format="dummy", skip_tokenizer_init=tokenizer is None,
                                  tokenizer=tokenizer,
                                  prefill_precision=prefill, decode_precision=decode, max_model_len=max_len,
                                  max_num_batched_tokens=batched_tokens, max_num_seqs=max_seqs,
                                  enable_prefix_caching=False, hf_overrides=hf_overrides, enforce_eager=eager,
                                  prefill_attention=prefill_attention, tensor_parallel_size=tensor_parallel_size))


def _release_memory():
    """Call after dropping the last reference to an engine, so the next one sizes its KV cache on a free card."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, min(vocab, 150000), (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _method_tensors(method) -> list[torch.Tensor]:
    """The tensors a linear or experts method holds (an experts method's per-expert methods included)."""
    tensors = []
    for value in vars(method).values():
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(value, list):
            tensors += [t for m in value if hasattr(m, "__dict__") for t in _method_tensors(m)]
    return tensors


def weight_bytes(engine: LLMEngine) -> int:
    """Weight bytes held for both phases (fp8/bf16 keeps the BF16 weights and an FP8 copy)."""
    tensors = list(engine.model_runner.model.parameters())
    for layer in engine.model_runner.model.phase_routed_layers():
        for method in (layer.prefill_method, layer.decode_method):
            tensors += _method_tensors(method)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}  # views count once
    return sum(storages.values())


def memory_notes(engine: LLMEngine) -> dict:
    """The weight memory of both phases (of one rank under tensor parallelism) and the KV tokens left beside it."""
    return {"weight_gib": round(weight_bytes(engine) / 2**30, 2), "kv_cache_tokens": engine.kv_cache_tokens(),
            "tensor_parallel_size": engine.config.tensor_parallel_size}


def bench_prefill(model: str, pairs: list[str], contexts: list[int], repeats: int, hf_overrides: dict | None,
                  compare_transformers: bool, attentions: tuple[str, ...] = ("bf16",), eager: bool = False,
                  tensor_parallel_size: int = 1) -> list[Row]:
    """Every pair with every prompt attention (EngineConfig.prefill_attention), each against bf16/bf16 with bf16
    attention ("auto" resolves to bf16 for bf16/bf16)."""
    rows: list[Row] = []
    for pair, attention in [(p, a) for a in attentions for p in pairs]:
        engine = _engine(model, pair, max(contexts) + 16, max(contexts), 4, hf_overrides, eager=eager,
                         prefill_attention=attention, tensor_parallel_size=tensor_parallel_size)
        notes = {**memory_notes(engine), "prefill_graphs": engine.model_runner.prefill_graphs is not None,
                 "prefill_attention": engine.config.prefill_attention,
                 "fp8_attention_min_tokens": engine.config.fp8_attention_min_tokens}
        for context in contexts:
            prompt = _random_prompt(context, engine.hf_config.vocab_size, context)

            def one_prefill():
                engine.add_request("p", prompt, SamplingParams(max_tokens=1, ignore_eos=True))
                while engine.has_unfinished_requests():
                    engine.step()

            t = timed(one_prefill, repeats, warmup=2)  # the second run settles the fused kernels' compiles
            prefill, decode = pair.split("/")
            rows.append(Row("prefill", "mixquant", prefill, decode, context, 1, context / t, t,
                            tflops=prefill_flops(engine.hf_config, context) / t / 1e12, prefill_attention=attention,
                            notes=dict(notes)))
            print(_line(rows[-1]), flush=True)
        engine.close()
        del engine
        _release_memory()
    if compare_transformers:
        rows += bench_transformers_prefill(model, contexts, repeats, hf_overrides)
    _set_ratios(rows, "prefill")
    return rows


def bench_transformers_prefill(model: str, contexts: list[int], repeats: int, hf_overrides: dict | None) -> list[Row]:
    from transformers import AutoModelForCausalLM

    config = load_config(Path(model), hf_overrides)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    rows = []
    for context in contexts:
        ids = torch.tensor([_random_prompt(context, config.vocab_size, context)], device=hf.device)
        with torch.inference_mode():
            t = timed(lambda: hf(ids, logits_to_keep=1), repeats)
        rows.append(Row("prefill", "transformers", "bf16", "bf16", context, 1, context / t, t,
                        tflops=prefill_flops(config, context) / t / 1e12))
        print(_line(rows[-1]), flush=True)
    del hf
    _release_memory()
    return rows


def bench_decode(model: str, pairs: list[str], batches: list[int], context: int, steps: int,
                 hf_overrides: dict | None, eager: bool = False, tensor_parallel_size: int = 1) -> list[Row]:
    rows: list[Row] = []
    for pair in pairs:
        engine = _engine(model, pair, context + steps + 64, 16384, max(batches), hf_overrides, eager=eager,
                         tensor_parallel_size=tensor_parallel_size)
        notes = memory_notes(engine)
        layout = engine.model_runner.kv_layout
        kv_per_token = layout.bytes_per_token()
        pool = engine.model_runner.state_pool  # a recurrent state is read and written whole every step
        state_per_sequence = 2 * pool.bytes_per_row if pool is not None else 0
        for batch in batches:
            for i in range(batch):
                engine.add_request(f"d{i}", _random_prompt(context, engine.hf_config.vocab_size, i),
                                   SamplingParams(max_tokens=steps * 4 + 8, ignore_eos=True))
            while any(seq.num_output_tokens == 0 for seq in engine.scheduler.running + list(engine.scheduler.waiting)):
                engine.step()
            t = timed(engine.step, steps, warmup=2)
            for i in range(batch):
                engine.abort_request(f"d{i}")
            prefill, decode = pair.split("/")
            # each row reads all its positions in full-attention layers and its window's in sliding ones
            kv_read = (kv_per_token["full"] * (context + steps)
                       + kv_per_token["sliding"] * min(context + steps, layout.window or 0))
            bytes_per_step = _decode_weight_bytes(engine, batch) + batch * (kv_read + state_per_sequence)
            rows.append(Row("decode", "mixquant", prefill, decode, context, batch, batch / t, t,
                            gbps=bytes_per_step / t / 1e9,
                            notes={**notes, "cuda_graphs": bool(engine.model_runner.graphs)}))
            print(_line(rows[-1]), flush=True)
        engine.close()
        del engine
        _release_memory()
    _set_ratios(rows, "decode")
    return rows


# A JSON schema no row completes within a benchmark (10,000 strings at least): constrained rows stay constrained,
# and the batch keeps its size, for every measured step.
ENDLESS_JSON = {"type": "object", "required": ["notes"], "properties": {
    "notes": {"type": "array", "minItems": 10000, "items": {"type": "string"}}}}


def bench_structured(model: str, pairs: list[str], batch: int, fractions: list[float], context: int, steps: int,
                     tokenizer: str | None, eager: bool = False) -> list[Row]:
    """Decode steps of `batch` sequences of which each fraction is held to a JSON schema, per pair.

    Every row of a step gets one token, so an unconstrained row's speed is 1 / step time: its loss in a mixed batch
    is the step time's growth over the unconstrained batch's (notes['unconstrained_row_loss']). Also measured apart,
    on the same rows: the host's bitmask fill for the constrained rows and the device's masking of the logits.
    """
    rows: list[Row] = []
    for pair in pairs:
        engine = _engine(model, pair, context + steps * 4 + 64, 16384, batch, None, eager,
                         tokenizer=tokenizer or model)
        baseline = None  # the step time with no row constrained
        for fraction in fractions:
            constrained = round(batch * fraction)
            for i in range(batch):
                spec = StructuredOutputsParams(json=ENDLESS_JSON) if i < constrained else None
                engine.add_request(f"s{i}", _random_prompt(context, engine.hf_config.vocab_size, i),
                                   SamplingParams(max_tokens=steps * 4 + 8, ignore_eos=True, structured_outputs=spec))
            while engine.waiting_for_grammar or any(seq.num_output_tokens == 0 for seq in engine.scheduler.running
                                                    + list(engine.scheduler.waiting)):
                engine.step()
            t = timed(engine.step, steps, warmup=2)
            notes = {"constrained_rows": constrained, "step_ms": round(t * 1e3, 3), **_mask_costs(engine)}
            for i in range(batch):
                engine.abort_request(f"s{i}")
            if constrained == 0:
                baseline = t
            mixed = baseline is not None and 0 < constrained < batch
            notes["unconstrained_row_loss"] = round(1 - baseline / t, 4) if mixed else None
            prefill, decode = pair.split("/")
            rows.append(Row("structured", "mixquant", prefill, decode, context, batch, batch / t, t, notes=notes))
            print(f"structured {pair:10} batch {batch:3d} constrained {constrained:3d}: {batch / t:9.1f} tok/s, "
                  f"step {t * 1e3:8.2f} ms, mask fill {notes['mask_fill_ms']:7.3f} ms, apply "
                  f"{notes['mask_apply_ms']:7.3f} ms, unconstrained-row loss {notes['unconstrained_row_loss']}",
                  flush=True)
        del engine
        _release_memory()
    return rows


def _mask_costs(engine: LLMEngine, repeats: int = 20) -> dict:
    """What a step's grammar work costs on the running batch: the host's bitmask fill, the device's masking."""
    grammars = [seq.grammar for seq in engine.scheduler.running]
    constrained = sum(grammar is not None for grammar in grammars)
    if not constrained:
        return {"mask_fill_ms": 0.0, "mask_fill_us_per_row": None, "mask_apply_ms": 0.0}
    fills = []
    for _ in range(repeats):  # filling does not advance the grammars: each repeat fills the same masks
        start = time.perf_counter()
        bitmask = engine.structured_output.fill_bitmask(grammars)
        fills.append(time.perf_counter() - start)
    fill = statistics.median(fills)
    logits = torch.randn(len(grammars), engine.hf_config.vocab_size, device=engine.config.device_obj)
    apply = timed(lambda: apply_token_bitmask(logits, bitmask), repeats)
    return {"mask_fill_ms": round(fill * 1e3, 3), "mask_fill_us_per_row": round(fill / constrained * 1e6, 1),
            "mask_apply_ms": round(apply * 1e3, 3)}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _decode_weight_bytes(engine: LLMEngine, batch: int) -> int:
    """Bytes a decode step of `batch` rows streams: every decode-phase linear weight (and scales), the head, and of
    each MoE layer the experts its rows are routed to: top_k at batch 1, and beyond that the number a uniform
    router reaches, E * (1 - (1 - k/E)^batch) (an estimate: random weights route close to uniformly)."""
    model = engine.model_runner.model
    total = _nbytes([model.lm_head.weight])
    for layer in model.phase_routed_layers():
        method = layer.decode_method
        if isinstance(layer, GroupedExperts):
            experts = layer.num_experts
            top_k = experts_per_token(engine.hf_config)
            reached = experts * (1 - (1 - top_k / experts) ** batch)
            per_expert = _nbytes(_method_tensors(method)) / experts
            total += int(reached * per_expert)
            continue
        total += _nbytes(getattr(method, name) for name in ("weight", "qweight", "weight_scale", "packed",
                                                            "block_scale")
                         if isinstance(getattr(method, name, None), torch.Tensor))
    return total


def _set_ratios(rows: list[Row], kind: str):
    """Each row against the mixquant bf16/bf16 row (bf16 attention) of the same context and batch (transformers:
    the same)."""
    base = {(r.context, r.batch): r for r in rows if r.engine == "mixquant" and r.kind == kind
            and r.label == "bf16/bf16"}
    for r in rows:
        ref = base.get((r.context, r.batch))
        r.ratio_to_baseline = round(r.tokens_per_s / ref.tokens_per_s, 3) if ref else None


def _line(r: Row) -> str:
    rate = f"{r.tflops:7.1f} TFLOP/s" if r.tflops is not None else f"{r.gbps:7.0f} GB/s"
    return (f"{r.kind:8} {r.engine:12} {r.label:21} ctx {r.context:7d} "
            f"batch {r.batch:4d} {r.tokens_per_s:11.1f} tok/s  {rate}")

