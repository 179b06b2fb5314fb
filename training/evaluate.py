"""Held-out accuracy of a model on the generated tasks, through the mixquant engine.

    python -m training.evaluate [MODEL] [--count 200] [--prefill-precision bf16] [--decode-precision bf16]
    python -m training.evaluate MODEL --tasks retrieval --retrieval-questions name_by_id --max-records 2

Greedy, the prompt rendered with the model's chat template as the server renders it; an answer is correct by
`mixquant fidelity`'s rule (the gold string is in the generated text). MODEL defaults to the bundled mixquant-tiny.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

from mixquant.fidelity.run import BUCKETS, is_correct
from mixquant.tiny import bundled_model_path, tasks


def length_bucket(tokens: int) -> str:
    return next(name for low, high, name in BUCKETS if low <= tokens < high)


def prompt_ids(tokenizer, example: tasks.Example) -> list[int]:
    return tokenizer(example.render_prompt(tokenizer), add_special_tokens=False)["input_ids"]


def heldout_examples(task_names: list[str], count: int, retrieval_kinds: tuple[str, ...] | None = None,
                     max_records: int | None = None) -> list[tasks.Example]:
    """`count` held-out examples of each task; retrieval ones optionally narrowed to some questions or list sizes."""
    retrieval = {"kinds": retrieval_kinds} if retrieval_kinds else {}
    if max_records:
        retrieval["max_records"] = max_records
    return [e for task in task_names for e in tasks.heldout(task, count, **(retrieval if task == "retrieval" else {}))]


def evaluate(llm, examples: list[tasks.Example], max_tokens: int = tasks.MAX_REPLY_TOKENS) -> dict:
    """{'by_task': {task: {bucket: [correct, n]}}, 'failures': a few wrong answers to look at, 'cut_off': how many
    generations the token limit ended}."""
    from mixquant.sampling_params import SamplingParams

    tokenizer = llm.get_tokenizer()
    prompts = [prompt_ids(tokenizer, e) for e in examples]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    failures = []
    for example, ids, out in zip(examples, prompts, outputs):
        text = out.outputs[0].text
        correct = is_correct(text, example.answer)
        for bucket in ("all", length_bucket(len(ids))):
            counts[example.task][bucket][0] += correct
            counts[example.task][bucket][1] += 1
        if not correct and len(failures) < 12:
            failures.append({"task": example.task, "prompt_tokens": len(ids), "gold": example.answer,
                             "output": text[-300:]})
    return {"by_task": {t: dict(b) for t, b in counts.items()}, "failures": failures,
            "cut_off": sum(out.outputs[0].finish_reason == "length" for out in outputs)}


def main(argv: list[str] | None = None) -> int:
    from mixquant import LLM
    from training.train import question_kinds

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=str(bundled_model_path()))
    parser.add_argument("--count", type=int, default=200, help="held-out examples per task")
    parser.add_argument("--tasks", default=",".join(tasks.TASKS))
    parser.add_argument("--prefill-precision", default="bf16")
    parser.add_argument("--decode-precision", default="bf16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", help="write the result as JSON here too")
    parser.add_argument("--retrieval-questions", type=question_kinds, metavar="KIND,...",
                        help=f"ask only these retrieval questions (of {', '.join(tasks.QUESTION_KINDS)})")
    parser.add_argument("--max-records", type=int, help="retrieval lists of at most this many records")
    args = parser.parse_args(argv)
    examples = heldout_examples(args.tasks.split(","), args.count, args.retrieval_questions, args.max_records)
    llm = LLM(args.model, prefill_precision=args.prefill_precision, decode_precision=args.decode_precision,
              device=args.device)
    result = evaluate(llm, examples)
    for task, buckets in result["by_task"].items():
        print(task, "  ".join(f"{b}: {c}/{n} ({c / n:.1%})" for b, (c, n) in buckets.items()))
    for failure in result["failures"]:
        print("FAIL", json.dumps(failure))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
