"""`mixquant fidelity` end to end on the tiny random model (CPU)."""
from __future__ import annotations

import json

import pytest

from mixquant.cli import main

PROMPTS = [{"prompt": "Records: id 1 value 7, id 2 value 9. Value of id 2?", "answer": "9"},
           {"prompt": "Compute 2 + 2 and box it.", "answer": "4"},
           {"messages": [{"role": "user", "content": "Say hello to the tool."}]}]


def test_fidelity_against_bf16(tiny_qwen3, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in PROMPTS))
    out = tmp_path / "out"
    assert main(["fidelity", str(tiny_qwen3), "--pairs", "fp8/bf16,nvfp4/nvfp4", "--prompts", str(prompts),
                 "--max-tokens", "6", "--dtype", "float32", "--device", "cpu", "--output-dir", str(out)]) == 0
    result = json.loads((out / "fidelity.json").read_text())["pairs"]
    assert list(result) == ["bf16/bf16", "fp8/bf16", "nvfp4/nvfp4"]  # the reference is always measured
    ref = result["bf16/bf16"]["all"]
    assert (ref["kl_mean"], ref["top1_agreement"], ref["first_divergence_mean"]) == (0.0, 1.0, 6.0)
    assert ref["n"] == 3 and ref["accuracy_n"] == 2
    for pair in ("fp8/bf16", "nvfp4/nvfp4"):
        assert result[pair]["all"]["kl_mean"] > 0
    assert result["nvfp4/nvfp4"]["all"]["kl_mean"] > result["fp8/bf16"]["all"]["kl_mean"]
    assert (out / "fidelity.png").stat().st_size > 0
    assert "| fp8/bf16 | all | 3 |" in (out / "fidelity.md").read_text()
    assert "top-1 agreement" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--pairs", "fp8/int4"], "bad pair"),
    (["--prompts", "/does/not/exist.jsonl"], "does not exist"),
])
def test_bad_inputs(tiny_qwen3, argv, message):
    with pytest.raises(ValueError, match=message):
        main(["fidelity", str(tiny_qwen3), "--device", "cpu", *argv])


def test_empty_prompts_file(tiny_qwen3, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        main(["fidelity", str(tiny_qwen3), "--device", "cpu", "--prompts", str(empty)])
