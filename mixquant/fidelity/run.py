"""`mixquant fidelity`: what each precision pair costs against bf16/bf16, on any supported model.

For every prompt the BF16 engine generates a greedy reference continuation. Each pair then (1) scores that same
continuation teacher-forced (`LLMEngine.teacher_forced_logprobs`, continuation in decode precision as generation
runs it), compared with BF16's own scores by KL and top-1 agreement, and (2) generates greedily itself, giving
the position where it first leaves the reference and, when the prompt has a gold answer, its accuracy.
"""
from __future__ import annotations

import gc
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from mixquant.config import PRECISIONS
from mixquant.eval.scoring import last_boxed
from mixquant.fidelity.metrics import first_divergence, kl_divergence, top1_agreement, wilson_interval
from mixquant.llm import LLM
from mixquant.sampling_params import SamplingParams

DEFAULT_PROMPTS = [
    {"prompt": "Records:\n" + "".join(f"id {i}: name item{i}, value {i * 37 % 101}\n" for i in range(40))
               + "Question: what is the value of item17? Answer:", "answer": str(17 * 37 % 101)},
    {"prompt": "Compute 12 + 35 - 7 and give the result in \\boxed{}.", "answer": "40"},
    {"prompt": "<tools>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"string\"}}</tools>\n"
               "User: What is the weather in Paris?\nAssistant:"},
    {"prompt": "The quick brown fox jumps over the lazy dog. " * 60 + "Summarize the text above in one sentence:"},
    {"prompt": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"},
    {"prompt": "Translate to French: The tool returned three results, all of them empty."},
    {"prompt": "Q: A train leaves at 3 pm and travels 120 km at 60 km/h. When does it arrive?\nA:",
     "answer": "5 pm"},
    {"prompt": "List three prime numbers greater than 50:"},
]
BUCKETS = [(0, 512, "<512"), (512, 2048, "512-2k"), (2048, 8192, "2k-8k"), (8192, 1 << 62, ">=8k")]


@dataclass
class Sample:
    prompt_ids: list[int]
    answer: str | None


def parse_pairs(text: str) -> list[str]:
    pairs = [p.strip() for p in text.split(",") if p.strip()]
    for pair in pairs:
        parts = pair.split("/")
        if len(parts) != 2 or any(p not in PRECISIONS for p in parts):
            raise ValueError(f"bad pair {pair!r}: write PREFILL/DECODE with each of {', '.join(PRECISIONS)}")
    return ["bf16/bf16"] + [p for p in pairs if p != "bf16/bf16"]  # the reference always runs first


def read_prompts(path: str | None) -> list[dict]:
    if path is None:
        return DEFAULT_PROMPTS
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--prompts file {path} does not exist")
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"--prompts file {path} holds no prompts")
    for i, row in enumerate(rows):
        if "prompt" not in row and "messages" not in row:
            raise ValueError(f"{path} line {i + 1}: needs a 'prompt' string or a 'messages' list")
    return rows


def tokenize(llm: LLM, rows: list[dict]) -> list[Sample]:
    tokenizer = llm.get_tokenizer()
    samples = []
    for row in rows:
        if "messages" in row:
            text = tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True,
                                                 enable_thinking=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(row["prompt"])["input_ids"]
        samples.append(Sample(ids, row.get("answer")))
    return samples


def is_correct(text: str, answer: str) -> bool:
    """The gold answer appears in the generated text (after stripping), or as its last \\boxed{} content."""
    boxed = last_boxed(text)
    return answer.strip() in text or (boxed is not None and boxed.strip() == answer.strip())


def run_fidelity(model: str, pairs: list[str], rows: list[dict], max_tokens: int, **engine_kwargs) -> dict:
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    reference_scores: list[torch.Tensor] = []
    reference_tokens: list[list[int]] = []
    per_pair: dict[str, list[dict]] = {}
    for pair in pairs:
        prefill, decode = pair.split("/")
        llm = LLM(model, prefill_precision=prefill, decode_precision=decode, **engine_kwargs)
        samples = tokenize(llm, rows)
        outputs = [o.outputs[0] for o in llm.generate([s.prompt_ids for s in samples], greedy, use_tqdm=False)]
        if not reference_tokens:
            reference_tokens = [o.token_ids for o in outputs]
        records = []
        for i, (sample, out) in enumerate(zip(samples, outputs)):
            scores = llm.engine.teacher_forced_logprobs(sample.prompt_ids, reference_tokens[i]).cpu()
            if len(reference_scores) < len(samples):
                reference_scores.append(scores)
            kl = kl_divergence(reference_scores[i], scores)
            records.append({"prompt_tokens": len(sample.prompt_ids), "kl": kl.tolist(),
                            "top1_agreement": top1_agreement(reference_scores[i], scores),
                            "first_divergence": first_divergence(reference_tokens[i], out.token_ids),
                            "correct": None if sample.answer is None else is_correct(out.text, sample.answer)})
        per_pair[pair] = records
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"model": model, "max_tokens": max_tokens, "pairs": {p: summarize(r) for p, r in per_pair.items()}}


def summarize(records: list[dict]) -> dict:
    """Per context bucket present, plus 'all'."""
    groups = {"all": records}
    for low, high, name in BUCKETS:
        members = [r for r in records if low <= r["prompt_tokens"] < high]
        if members and len(members) < len(records):
            groups[name] = members
    return {name: _stats(members) for name, members in groups.items()}


def _stats(records: list[dict]) -> dict:
    kl = sorted(v for r in records for v in r["kl"])
    graded = [r["correct"] for r in records if r["correct"] is not None]
    stats = {"n": len(records), "kl_mean": statistics.fmean(kl), "kl_p99": kl[min(len(kl) - 1, int(0.99 * len(kl)))],
             "top1_agreement": statistics.fmean(r["top1_agreement"] for r in records),
             "first_divergence_mean": statistics.fmean(r["first_divergence"] for r in records)}
    if graded:
        stats.update(accuracy=sum(graded) / len(graded), accuracy_n=len(graded),
                     accuracy_ci95=wilson_interval(sum(graded), len(graded)))
    return stats


def markdown(result: dict) -> str:
    lines = ["| pair | bucket | n | KL mean | KL p99 | top-1 agreement | first divergence | accuracy (95% CI) |",
             "|---|---|---|---|---|---|---|---|"]
    for pair, buckets in result["pairs"].items():
        for bucket, s in buckets.items():
            acc = (f"{s['accuracy']:.2f} ({s['accuracy_ci95'][0]:.2f}-{s['accuracy_ci95'][1]:.2f}, "
                   f"n={s['accuracy_n']})" if "accuracy" in s else "-")
            lines.append(f"| {pair} | {bucket} | {s['n']} | {s['kl_mean']:.3g} | {s['kl_p99']:.3g} | "
                         f"{s['top1_agreement']:.3f} | {s['first_divergence_mean']:.1f} | {acc} |")
    return "\n".join(lines)


def plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(result["pairs"])
    buckets = sorted({b for s in result["pairs"].values() for b in s})
    fig, (ax_kl, ax_agree) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(buckets)
    for j, bucket in enumerate(buckets):
        xs = [i + j * width for i in range(len(pairs))]
        stats = [result["pairs"][p].get(bucket) for p in pairs]
        ax_kl.bar(xs, [s["kl_mean"] if s else 0 for s in stats], width, label=bucket)
        ax_agree.bar(xs, [s["top1_agreement"] if s else 0 for s in stats], width, label=bucket)
    for ax, title in ((ax_kl, "mean KL to bf16/bf16 (teacher-forced)"), (ax_agree, "top-1 agreement")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(pairs))], pairs)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
