"""The training code of mixquant-tiny (training/): its rows, schedule, curriculum and command line (CPU)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from mixquant.tiny import bundled_model_path, tasks
from training.train import SEQ_LEN, PackedStream, learning_rate


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(bundled_model_path()))


def test_whole_line_questions_are_for_training_only():
    from training.train import TRAIN_QUESTION_KINDS

    assert not any("as listed" in e.messages[1]["content"] for e in tasks.heldout("retrieval", 60))
    examples = [tasks.generate("retrieval", tasks.TRAIN_SEED_BASE + s, kinds=TRAIN_QUESTION_KINDS) for s in range(40)]
    quotes = [e for e in examples if "as listed" in e.messages[1]["content"]]
    assert 8 <= len(quotes) <= 30  # three in seven
    counts, repeats = set(), 0
    for e in quotes:
        prompt = e.messages[1]["content"]
        lines = [r for r in prompt.splitlines() if r.startswith("record ")]
        if "Repeat the" in prompt:  # the list itself, or its first 16 lines
            repeats += 1
            assert e.answer.splitlines() == ["R" + line[1:] + "." for line in lines[:tasks.COPY_LINES]]
            assert ("first 16" in prompt) == (len(lines) > tasks.COPY_LINES)
            continue
        asked = prompt.split("Show record")[1].split(" as listed")[0].lstrip("s ").replace(" and", ",").split(", ")
        by_id = {line.split(":")[0].split()[1]: line for line in lines}
        assert e.answer.splitlines() == ["R" + by_id[i][1:] + "." for i in asked]
        counts.add(len(asked))
    assert 1 in counts and max(counts) > 3 and 0 < repeats < len(quotes)


def test_shared_names_recur_in_a_list_yet_name_one_person_each():
    def names(example):
        return [line.split(", name ")[1].split(", city ")[0]
                for line in example.messages[1]["content"].splitlines() if line.startswith("record ")]

    for seed in range(20):
        shared = names(tasks.generate("retrieval", tasks.TRAIN_SEED_BASE + seed, shared_names=True))
        words = max(2, math.ceil(math.sqrt(len(shared))))
        assert len(set(shared)) == len(shared)
        assert len({n.split()[0] for n in shared}) <= words and len({n.split()[1] for n in shared}) <= words
    plain = names(tasks.generate("retrieval", 7, max_records=190))
    assert names(tasks.generate("retrieval", 7, max_records=190, shared_names=False)) == plain
    assert len({n.split()[0] for n in plain}) > math.ceil(math.sqrt(len(plain)))
    # training asks for them per list, for the share --shared-names gives
    from training.train import question_kinds, task_mix

    tok = AutoTokenizer.from_pretrained(str(bundled_model_path()))
    stream = PackedStream(str(bundled_model_path()), seed=0, mix=task_mix("retrieval=1"),
                          retrieval_kinds=question_kinds("city_by_name"), max_records=16, shared_names=1.0)
    prompts = tok.decode(next(iter(stream))["input_ids"]).split("<|im_start|>user")[1:]
    for prompt in prompts:
        lines = [line for line in prompt.splitlines() if line.startswith("record ")]
        firsts = {line.split(", name ")[1].split()[0] for line in lines}
        assert len(firsts) <= max(2, math.ceil(math.sqrt(len(lines))))


def test_packed_rows_train_only_the_answer_turn(tokenizer):
    row = next(iter(PackedStream(str(bundled_model_path()), seed=0)))
    assert all(row[k].shape == (SEQ_LEN,) for k in row)
    targets, inputs = row["targets"], row["input_ids"]
    scored = targets != -100
    # a target is the next input token, and every scored span is an assistant turn ending in <|im_end|>
    assert torch.equal(inputs[1:][scored[:-1]], targets[:-1][scored[:-1]])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    starts = [i for i in range(1, SEQ_LEN) if scored[i] and not scored[i - 1]] + ([0] if scored[0] else [])
    assert starts
    for start in starts:
        assert tokenizer.decode(inputs[max(0, start - 2):start + 1]).endswith(("assistant\n", "</think>\n\n"))
        end = start
        while end + 1 < SEQ_LEN and scored[end + 1]:
            end += 1
        assert targets[end] == im_end
        assert row["documents"][start] == row["documents"][end]
        assert row["task_of_target"][start] >= 0
    # positions restart with each packed example
    assert (row["positions"][row["documents"] == 1][:1] == 0).all()


def test_learning_rate_warms_up_then_decays():
    assert learning_rate(0.0, 1.0) == 0.0
    assert learning_rate(0.03, 1.0) == pytest.approx(1.0)
    assert learning_rate(1.0, 1.0) == pytest.approx(0.1)
    values = [learning_rate(p / 100, 1.0) for p in range(3, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_chained_runs_share_one_schedule():
    import argparse

    from training.train import in_schedule, restart_ramp, schedule_span

    # the second of two chained runs starts where one long run would be halfway: decayed, no second warm-up
    assert learning_rate(in_schedule(0.0, (0.5, 1.0)), 1.0) == pytest.approx(learning_rate(0.5, 1.0))
    assert in_schedule(1.0, (0.0, 0.34)) == pytest.approx(0.34)
    # ... with a fresh optimizer, which ramps up over its own first steps; a run from the start has the warm-up
    assert restart_ramp(0.0, (0.5, 1.0)) == 0.0 and restart_ramp(0.015, (0.5, 1.0)) == pytest.approx(0.5)
    assert restart_ramp(0.5, (0.5, 1.0)) == 1.0 and restart_ramp(0.0, (0.0, 0.34)) == 1.0
    assert schedule_span("0.34:0.67") == (0.34, 0.67)
    for bad in ("0.5", "0.6:0.4", "0:1.5", "a:b"):
        with pytest.raises(argparse.ArgumentTypeError):
            schedule_span(bad)


def test_kv_heads_are_refused_for_a_continued_checkpoint(tmp_path):
    from training.train import main

    with pytest.raises(SystemExit):
        main(["--output-dir", str(tmp_path), "--init-from", str(bundled_model_path()), "--kv-heads", "6"])


def test_a_shared_names_share_outside_0_to_1_is_refused(tmp_path, capsys):
    from training.train import main

    for bad in ("1.5", "-0.1"):
        with pytest.raises(SystemExit):
            main(["--output-dir", str(tmp_path), "--shared-names", bad])
        assert "--shared-names" in capsys.readouterr().err


def test_training_continues_from_the_bundled_checkpoint_and_saves_it(tmp_path):
    from training.train import main

    out = tmp_path / "continued"
    assert main(["--output-dir", str(out), "--init-from", str(bundled_model_path()), "--max-steps", "1",
                 "--batch-rows", "1", "--workers", "0", "--device", "cpu", "--log-every", "1"]) == 0
    assert (out / "model.safetensors").stat().st_size > 30e6
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["temperature"] == 0.0 and generation["do_sample"] is False  # served greedy
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1]
    assert (out / "loss.png").stat().st_size > 0


def test_an_experiment_trains_on_one_task_and_question_kind():
    import argparse

    from training.train import question_kinds, task_mix

    assert task_mix("retrieval=1,arithmetic=0.5") == {"retrieval": 1.0, "arithmetic": 0.5}
    for bad in ("retrival=1", "retrieval", "retrieval=-1", "retrieval=0"):
        with pytest.raises(argparse.ArgumentTypeError):
            task_mix(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        question_kinds("name_by_id,age_by_id")
    stream = PackedStream(str(bundled_model_path()), seed=0, mix=task_mix("retrieval=1"),
                          retrieval_kinds=question_kinds("name_by_id"), max_records=3)
    row = next(iter(stream))
    scored = row["task_of_target"][row["targets"] != -100]
    assert scored.numel() and (scored == tasks.TASKS.index("retrieval")).all()
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(str(bundled_model_path())).decode(row["input_ids"])
    assert text.count("What is the name on record") == text.count("<|im_start|>assistant")
    assert "record" in text and text.count("\nrecord ") <= 3 * text.count("<|im_start|>assistant")


def test_record_lists_grow_over_a_run_as_the_curriculum_says():
    import argparse

    from training.train import question_kinds, record_stage, record_stages, task_mix

    assert record_stages("8") == [(8, 1.0)]
    schedule = record_stages("2:0.25,4:0.25,190:0.5")
    assert [record_stage(schedule, p) for p in (0, 0.2, 0.25, 0.49, 0.5, 0.99, 1.0)] == [0, 0, 1, 1, 2, 2, 2]
    for bad, problem in (("2:0.5,4:0.4", "add up to 1"), ("2:0.5,4", "its share"), ("0", "positive"),
                         ("2:-0.5,4:1.5", "positive"), ("two", "expected N")):
        with pytest.raises(argparse.ArgumentTypeError, match=problem):
            record_stages(bad)
    # the cap is read per example, so a run raises it for the examples made after
    tok = AutoTokenizer.from_pretrained(str(bundled_model_path()))
    stream = PackedStream(str(bundled_model_path()), seed=0, mix=task_mix("retrieval=1"),
                          retrieval_kinds=question_kinds("name_by_id"), max_records=1)
    rows = iter(stream)
    most = []
    for cap in (1, 2, 0):
        stream.record_cap.value = cap
        next(rows)  # the row in the making when the cap changed
        text = tok.decode(next(rows)["input_ids"])
        lists = [prompt.count("\nrecord ") for prompt in text.split("<|im_start|>user")[1:]]
        most.append(max(lists))
    assert most[0] == 1 and most[1] == 2 and most[2] > 2


def test_heldout_retrieval_can_be_narrowed_to_one_question_and_short_lists():
    from training.evaluate import heldout_examples, main

    examples = heldout_examples(["retrieval", "arithmetic"], 6, ("name_by_id",), 2)
    retrieval = [e for e in examples if e.task == "retrieval"]
    assert len(retrieval) == 6 and len(examples) == 12
    assert all(e.meta["records"] == 2 and "What is the name on record" in e.messages[1]["content"] for e in retrieval)
    assert heldout_examples(["retrieval"], 6) == tasks.heldout("retrieval", 6)  # the held-out set, unnarrowed
    with pytest.raises(SystemExit):
        main(["--retrieval-questions", "age_by_id"])


class NextTokenOracle(torch.nn.Module):
    """Logits on the token that follows in the row (right on every target) or on the current one (never right)."""

    def __init__(self, right: bool):
        super().__init__()
        self.right, self.anchor = right, torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"_attn_implementation": "flex_attention"})()

    def forward(self, input_ids, position_ids, attention_mask):
        chosen = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], 1) if self.right else input_ids
        return type("Output", (), {"logits": torch.nn.functional.one_hot(chosen, 1408).float()})


def test_the_in_run_check_scores_every_token_of_the_field_asked_for(tokenizer):
    import argparse

    from training.train import check_kinds, lookup_check_rows, lookups_right

    rows, spans = lookup_check_rows(tokenizer, max_records=4, kinds=("name_by_id", "city_by_name"), count=10)
    assert len(spans) == 10 and len(rows) == 1  # ten 4-record questions fit one row
    fields = [tokenizer.decode(rows[row]["targets"][a:b]).split() for row, a, b in spans]
    assert all(len(f) == 2 and f[0] in tasks.FIRST_NAMES and f[1] in tasks.LAST_NAMES for f in fields[::2])
    assert all(len(f) == 1 and f[0] in tasks.CITIES for f in fields[1::2])
    text = tokenizer.decode(rows[0]["input_ids"])
    assert text.count("What is the name on record") == 5 and text.count("Which city is") == 5
    # seeds of their own: no prompt of the held-out sets (the same generator calls, from seed 0)
    heldout = [e.messages[1]["content"] for kind in ("name_by_id", "city_by_name")
               for e in tasks.heldout("retrieval", 200, max_records=4, kinds=(kind,))]
    assert not any(content in text for content in heldout)
    oracles = [NextTokenOracle(right) for right in (True, False)]
    assert [lookups_right(oracle, rows, spans) for oracle in oracles] == [1.0, 0.0]
    assert oracles[0].config._attn_implementation == "flex_attention"  # training's attention, given back
    with pytest.raises(argparse.ArgumentTypeError, match="name_by_id or city_by_name"):
        check_kinds("value_by_id")


def test_a_curriculum_stage_ends_when_its_check_passes(tmp_path, monkeypatch):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from training import train

    small = tmp_path / "small"  # one narrow layer: the steps are the test's cost
    Qwen3ForCausalLM(Qwen3Config(vocab_size=1408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=16)).save_pretrained(small)
    accuracies = iter([1.0, 0.5, 0.5, 0.5])
    monkeypatch.setattr(train, "lookups_right", lambda *args: next(accuracies))
    out = tmp_path / "run"
    assert train.main(["--output-dir", str(out), "--init-from", str(small), "--max-steps", "5", "--batch-rows", "1",
                       "--workers", "0", "--device", "cpu", "--log-every", "1", "--mix", "retrieval=1",
                       "--max-records", "1:0.4,2:0.4,3:0.2", "--advance-at", "0.9", "--check-every", "1"]) == 0
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    # the first stage's check passed at once (its share was two steps); the second's failed, so it held its share
    assert [r["max_records"] for r in records if "loss" in r] == [1, 2, 2, 2, 3]
    assert [r["check"]["max_records"] for r in records if "check" in r] == [1, 2, 2, 2]
    with pytest.raises(SystemExit):
        train.main(["--output-dir", str(tmp_path), "--advance-at", "0.9"])  # no curriculum to advance
