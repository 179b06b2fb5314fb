"""xgrammar against llguidance on this machine's CPU: what the choice of grammar library for constrained decoding
rests on (llguidance is no dependency of mixquant: pip install llguidance to run this).

Grammar work is host work (the masks are computed on the CPU while the GPU runs the forward pass), so this runs
anywhere. For each tokenizer (the bundled mixquant-tiny's, 1.4k tokens, and the real Qwen3's, 152k) and each JSON
schema it measures:
  - compile: a cold grammar compile (xgrammar: compile_json_schema with the cache off; llguidance: an LLMatcher
    built from the schema), the median of three;
  - mask: filling one row's token bitmask before each token of the canonical tokenization of eight valid instances,
    each on a fresh matcher of the same compiled grammar (mean, median, p99 and max per token);
  - batch: one step's masks for 32 matchers at 32 different positions (one call, one thread), per row.
Each statistic is the lowest of --runs runs: on a shared machine the others are the scheduler's doing.

Usage: PYTHONPATH=. python gpu_tests/compare_grammar_libraries.py [--runs 3] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import llguidance
import llguidance.hf
import llguidance.torch
import torch
import xgrammar as xgr
from transformers import AutoTokenizer

from mixquant.tiny import bundled_model_path
from tests.data import qwen3_tokenizer

WORDS = ("lars sato santiago order shipped pending paris weather record tokens prefill decode precision the of a "
         "quick brown fox jumps over lazy dog").split()
SCHEMAS = {
    "person": {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
               "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}}},
    "order": {"type": "object", "required": ["id", "status", "items"], "properties": {
        "id": {"type": "integer"}, "status": {"enum": ["pending", "shipped", "delivered"]},
        "items": {"type": "array", "items": {"type": "object", "required": ["sku", "qty"], "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "qty": {"type": "integer", "minimum": 1}}}},
        "note": {"type": ["string", "null"]}}},
    "tool_call": {"anyOf": [{"type": "object", "required": ["name", "arguments"], "properties": {
        "name": {"const": f"tool_{i}"}, "arguments": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}}}}} for i in range(8)]},
    "wide": {"type": "object", "properties": {
        f"field_{i}": {"type": "object", "properties": {
            f"k{j}": {"type": "string", "pattern": f"^[a-z]{{{j % 5 + 1},{j % 5 + 3}}}-[0-9]+$"} for j in range(20)}}
        for i in range(40)}},
}


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))


def instance(name: str, rng: random.Random) -> dict:
    if name == "person":
        return {"name": sentence(rng).title(), "age": rng.randint(1, 99), "city": sentence(rng)}
    if name == "order":
        items = [{"sku": "".join(rng.choice("ABCXYZ") for _ in range(3)) + f"-{rng.randint(0, 9999):04d}",
                  "qty": rng.randint(1, 50)} for _ in range(rng.randint(1, 4))]
        return {"id": rng.randint(1, 10**6), "status": rng.choice(["pending", "shipped"]), "items": items,
                "note": rng.choice([None, sentence(rng)])}
    if name == "tool_call":
        return {"name": f"tool_{rng.randint(0, 7)}", "arguments": {"city": sentence(rng), "days": rng.randint(1, 9)}}
    i = rng.randint(0, 39)
    return {f"field_{i}": {f"k{j}": "a" * (j % 5 + 1) + f"-{rng.randint(0, 99)}" for j in range(0, 20, 3)}}


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int):
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.vocab_size = vocab_size

    def compile(self, schema: dict):
        compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        return compiler.compile_json_schema(schema, any_whitespace=False)

    def matcher(self, compiled):
        return xgr.GrammarMatcher(compiled)

    def bitmask(self, rows: int) -> torch.Tensor:
        return xgr.allocate_token_bitmask(rows, self.vocab_size)

    @staticmethod
    def fill(matcher, bitmask: torch.Tensor, row: int):
        matcher.fill_next_token_bitmask(bitmask, row)

    def fill_batch(self, matchers: list, bitmask: torch.Tensor):
        xgr.BatchGrammarMatcher(1).batch_fill_next_token_bitmask(matchers, bitmask)

    @staticmethod
    def accept(matcher, token: int) -> bool:
        return matcher.accept_token(token)


class LLGuidance:
    name = "llguidance"
    # compact separators, as xgrammar's any_whitespace=False writes them
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.executor = llguidance.LLExecutor(1)
        self.vocab_size = vocab_size

    def compile(self, schema: dict):
        matcher = llguidance.LLMatcher(self.tokenizer,
                                       llguidance.LLMatcher.grammar_from_json_schema(schema, self.options))
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    @staticmethod
    def matcher(compiled):
        return compiled.deep_copy()

    def bitmask(self, rows: int) -> torch.Tensor:
        return llguidance.torch.allocate_token_bitmask(rows, self.vocab_size)

    @staticmethod
    def fill(matcher, bitmask: torch.Tensor, row: int):
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, row)

    def fill_batch(self, matchers: list, bitmask: torch.Tensor):
        llguidance.torch.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    @staticmethod
    def accept(matcher, token: int) -> bool:
        return matcher.consume_token(token)


def measure(library, tokenizer, schema_name: str) -> dict:
    schema = SCHEMAS[schema_name]
    compile_s = []
    for _ in range(3):
        start = time.perf_counter()
        compiled = library.compile(schema)
        compile_s.append(time.perf_counter() - start)
    rng = random.Random(0)
    sequences = [tokenizer(json.dumps(instance(schema_name, rng)), add_special_tokens=False)["input_ids"]
                 for _ in range(8)]
    bitmask = library.bitmask(1)
    mask_s = []
    for tokens in sequences:
        matcher = library.matcher(compiled)
        for token in tokens:
            start = time.perf_counter()
            library.fill(matcher, bitmask, 0)
            mask_s.append(time.perf_counter() - start)
            assert library.accept(matcher, token), (library.name, schema_name, tokenizer.decode(tokens))
    # 32 rows, each at its own position in its own instance
    rows = [(library.matcher(compiled), sequences[i % len(sequences)]) for i in range(32)]
    for i, (matcher, tokens) in enumerate(rows):
        for token in tokens[:i % len(tokens)]:
            library.accept(matcher, token)
    batch_mask = library.bitmask(len(rows))
    batch_s = []
    for _ in range(5):
        start = time.perf_counter()
        library.fill_batch([m for m, _ in rows], batch_mask)
        batch_s.append(time.perf_counter() - start)
    mask_s.sort()
    return {"compile_ms": round(statistics.median(compile_s) * 1e3, 2),
            "mask_mean_us": round(statistics.mean(mask_s) * 1e6, 1),
            "mask_median_us": round(statistics.median(mask_s) * 1e6, 1),
            "mask_p99_us": round(mask_s[int(0.99 * len(mask_s))] * 1e6, 1),
            "mask_max_us": round(mask_s[-1] * 1e6, 1),
            "batch32_per_row_us": round(statistics.median(batch_s) / len(rows) * 1e6, 1),
            "tokens": sum(map(len, sequences))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizers = {"mixquant-tiny": (str(bundled_model_path()), 1408), "qwen3": (str(qwen3_tokenizer()), 151936)}
    results = []
    for tokenizer_name, (path, vocab_size) in tokenizers.items():
        tokenizer = AutoTokenizer.from_pretrained(path)
        for cls in (XGrammar, LLGuidance):
            start = time.perf_counter()
            library = cls(tokenizer, vocab_size)
            setup_ms = (time.perf_counter() - start) * 1e3
            print(f"{tokenizer_name:13} {cls.name:10} tokenizer setup {setup_ms:7.0f} ms", flush=True)
            for schema_name in SCHEMAS:
                runs = [measure(library, tokenizer, schema_name) for _ in range(args.runs)]
                row = {"tokenizer": tokenizer_name, "library": cls.name, "schema": schema_name,
                       "setup_ms": round(setup_ms), **{key: min(run[key] for run in runs) for key in runs[0]}}
                results.append(row)
                print(f"{tokenizer_name:13} {cls.name:10} {schema_name:9} compile {row['compile_ms']:8.2f} ms | mask "
                      f"mean {row['mask_mean_us']:7.1f} median {row['mask_median_us']:7.1f} p99 "
                      f"{row['mask_p99_us']:7.1f} max {row['mask_max_us']:8.1f} us | batch of 32: "
                      f"{row['batch32_per_row_us']:6.1f} us/row", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
