"""The attention probe of record lookups, on the bundled model."""
from __future__ import annotations

import pytest
import torch

from mixquant.tiny import bundled_model_path
from training.probe import main, probe


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(bundled_model_path())
    return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval(),
            AutoTokenizer.from_pretrained(path))


def test_probe_reports_attention_on_each_lines_field(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    result = probe(model, tokenizer, "value_by_id", 10**8, records=3)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    assert result.attention.shape == (layers, heads, 3)
    assert (result.attention >= 0).all() and (result.attention.sum(-1) <= 1 + 1e-5).all()
    # the shipped weights look values up with one head (docs/tiny-model.md): it attends to the right line's value
    assert result.attention[..., 0].max() > 0.5 and 0.5 < result.p_answer <= 1


def test_probe_cli_prints_a_line_per_example(capsys):
    assert main(["--examples", "1", "--kinds", "name_by_id"]) == 0
    assert capsys.readouterr().out.count("name_by_id (2 records)") == 1
