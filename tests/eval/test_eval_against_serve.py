"""Each `mixquant eval` command end to end against a real `mixquant serve` (tiny random model, CPU).

A random model answers nonsense, so these check the plumbing, not accuracy: every item is asked and recorded,
metrics are written, and the run records the server's precisions.
"""
from __future__ import annotations

import json

from tests.eval.test_eval_runs import read_json, read_jsonl, run_eval, write_longbench
from tests.server.conftest import running_server, server_config, tiny_engine


def test_every_eval_command_against_mixquant_serve(tiny_qwen3, data_dir, tmp_path):
    engine = tiny_engine(tiny_qwen3, prefill_precision="fp8", decode_precision="bf16")
    config = server_config(tiny_qwen3, api_key=None)
    with running_server(engine, config) as server:
        base = f"{server.url}/v1"
        common = ["--base-url", base, "--model", "tiny-qwen3", "--max-tokens", "8", "--limit", "2"]
        assert run_eval("eval", "reasoning", "--datasets", "gsm8k,aime24", *common,
                        "--data-file", f"gsm8k={data_dir / 'gsm8k/test.jsonl'}",
                        "--data-file", f"aime24={data_dir / 'aime2024/aime24.jsonl'}",
                        "--output-dir", tmp_path / "reasoning") == 0
        for dataset in ("gsm8k", "aime24"):
            metrics = read_json(tmp_path / f"reasoning/{dataset}_seed42_metrics.json")
            assert metrics["n"] == 2 and 0 <= metrics["acc"] <= 1
            records = read_jsonl(tmp_path / f"reasoning/{dataset}_seed42.jsonl")
            assert len(records) == 2 and all(r["tokens"] > 0 for r in records)
            recorded = read_json(tmp_path / f"reasoning/{dataset}_seed42_config.json")
            assert json.dumps(recorded).count('"fp8"') >= 1  # the server's reported prefill precision

        write_longbench(tmp_path / "longbench.json")
        assert run_eval("eval", "longbench-v2", *common, "--data-file", tmp_path / "longbench.json",
                        "--tokenizer", data_dir / "qwen3-tokenizer", "--max-input-tokens", "200",
                        "--output-dir", tmp_path / "longbench") == 0
        assert read_json(tmp_path / "longbench/longbench-v2_seed42_metrics.json")["n"] == 2

        # the same server plays the judge: its yes/no is nonsense, but the judge path runs end to end
        assert run_eval("eval", "longmemeval", *common,
                        "--data-file", data_dir / "longmemeval/longmemeval_oracle_16q_reformatted.json",
                        "--judge-model", "tiny-qwen3", "--judge-base-url", base,
                        "--output-dir", tmp_path / "longmemeval") == 0
        records = read_jsonl(tmp_path / "longmemeval/longmemeval_seed42.jsonl")
        assert len(records) == 2
        assert read_json(tmp_path / "longmemeval/longmemeval_seed42_metrics.json")["n"] == 2

        assert run_eval("eval", "compare", tmp_path / "reasoning", tmp_path / "reasoning",
                        "--output", tmp_path / "compare") in (0, None)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
