"""`mixquant fidelity`: what each precision pair costs against bf16/bf16, on any supported model.

The bf16/bf16 engine generates a greedy reference continuation for every prompt and scores it teacher-forced.
Each pair (bf16/bf16 included, as a self-check) then (1) scores that same continuation teacher-forced
(`LLMEngine.teacher_forced_logprobs`: the continuation in decode precision, as generation runs it), compared with
the reference scores by KL and top-1 agreement, and (2) generates greedily itself, giving the position where it
first leaves the reference and, when the prompt has a gold answer, its accuracy.
"""
from __future__ import annotations

import gc
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mixquant.config import PRECISIONS
from mixquant.eval.scoring import last_boxed, math_equal
from mixquant.fidelity.metrics import (
    first_divergence,
    kl_divergence,
    percentile,
    top1_agreement,
    wilson_interval,
)
from mixquant.llm import LLM
from mixquant.sampling_params import SamplingParams

REFERENCE = "bf16/bf16"

# Agentic-looking prompts of different kinds, so that `mixquant fidelity MODEL` gives a first answer with no file.
DEFAULT_PROMPTS = [
    {"prompt": "Records:\n" + "".join(f"id {i}: name item{i}, value {i * 37 % 101}\n" for i in range(40))
               + "Question: what is the value of item17? Answer:", "answer": str(17 * 37 % 101)},
    {"prompt": "Compute 12 + 35 - 7 and give the result in \\boxed{}.", "answer": "40"},
    {"prompt": "<tools>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"string\"}}</tools>\n"
               "User: What is the weather in Paris? Answer with a tool call.\nAssistant:"},
    {"prompt": "The quick brown fox jumps over the lazy dog. " * 60 + "Summarize the text above in one sentence:"},
    {"prompt": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"},
    {"prompt": "Translate to French: The tool returned three results, all of them empty."},
    {"prompt": "Q: A train leaves at 3 pm and travels 120 km at 60 km/h. At what time does it arrive?\nA:",
     "answer": "5 pm"},
    {"prompt": "List three prime numbers greater than 50:"},
]

# Prompt-length buckets (tokens): prefill precision touches every prompt token, so long contexts may suffer more.
BUCKETS = [(0, 512, "<512"), (512, 2048, "512-2k"), (2048, 8192, "2k-8k"), (8192, 1 << 62, ">=8k")]
BUCKET_NAMES = [name for _, _, name in BUCKETS]
ALL = "all"


def is_task(group: str) -> bool:
    """A task's own group ('retrieval'), not 'all', a length bucket or a task's length bucket ('retrieval <512')."""
    return group != ALL and group not in BUCKET_NAMES and " " not in group


class FidelityInputError(ValueError):
    """Input the user can fix (a pair, a prompts file); reported as one line, before any model loads."""


@dataclass
class Sample:
    prompt_ids: list[int]
    answer: str | None
    task: str | None


@dataclass
class PromptResult:
    """One pair on one prompt."""

    prompt_tokens: int
    task: str | None
    kl: list[float]  # per scored position
    top1_agreement: float
    first_divergence: int
    correct: bool | None  # None: the prompt has no gold answer
    cut_off: bool  # graded, and the token limit ended the generation before the answer


@dataclass
class Stats:
    """One pair on one bucket of prompts."""

    n: int
    kl_mean: float
    kl_p99: float
    top1_agreement: float
    first_divergence_mean: float
    accuracy: float | None = None
    accuracy_n: int = 0
    accuracy_ci95: tuple[float, float] | None = None
    accuracy_cut_off: int = 0  # graded generations that the token limit ended before the answer

    @property
    def mostly_cut_off(self) -> bool:
        """Most graded generations ended at the limit: the accuracy measures the limit, not the pair."""
        return self.accuracy_cut_off * 2 > self.accuracy_n


@dataclass
class FidelityResult:
    model: str
    max_tokens: int
    pairs: dict[str, dict[str, Stats]] = field(default_factory=dict)  # pair -> group -> stats

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def has_accuracy(self) -> bool:
        return any(s.accuracy is not None for buckets in self.pairs.values() for s in buckets.values())

    @property
    def groups(self) -> list[str]:
        """Group names present, in the order `summarize` makes them ('all', length buckets, then tasks)."""
        return list(dict.fromkeys(g for groups in self.pairs.values() for g in groups))

    @property
    def plotted_groups(self) -> list[str]:
        """One bar series each: the tasks when prompts carry one, else the length buckets."""
        tasks = [g for g in self.groups if is_task(g)]
        return tasks or [g for g in self.groups if g in BUCKET_NAMES] or [ALL]


def parse_pairs(text: str) -> list[str]:
    """PREFILL/DECODE pairs, comma-separated; the reference comes first whether it was asked for or not."""
    pairs = [p.strip() for p in text.split(",") if p.strip()]
    if not pairs:
        raise FidelityInputError("--pairs names no pair")
    for pair in pairs:
        parts = pair.split("/")
        if len(parts) != 2 or any(p not in PRECISIONS for p in parts):
            raise FidelityInputError(f"bad pair {pair!r}: write PREFILL/DECODE with each of {', '.join(PRECISIONS)}")
    return [REFERENCE] + list(dict.fromkeys(p for p in pairs if p != REFERENCE))


def read_prompts(path: str | None, require_answer: bool = False) -> list[dict]:
    """JSONL rows with a 'prompt' string or a 'messages' chat list, an optional gold 'answer' string, optional
    'tools' (OpenAI schemas) and 'chat_template_kwargs' (over --enable-thinking) for 'messages', and an optional
    'task' name to group results by."""
    file = Path(path)
    if not file.is_file():
        raise FidelityInputError(f"{path} does not exist")
    rows = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FidelityInputError(f"{path} line {number}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not (isinstance(row.get("prompt"), str)
                                             or isinstance(row.get("messages"), list)):
            raise FidelityInputError(f"{path} line {number}: needs a 'prompt' string or a 'messages' list")
        if "answer" in row and not isinstance(row["answer"], str):
            raise FidelityInputError(f"{path} line {number}: 'answer' must be a string")
        if "task" in row and not (isinstance(row["task"], str) and row["task"].strip() and " " not in row["task"]):
            raise FidelityInputError(f"{path} line {number}: 'task' must be a name without spaces")
        for key, kind in (("tools", list), ("chat_template_kwargs", dict)):
            if key in row and not (isinstance(row[key], kind) and "messages" in row):
                raise FidelityInputError(f"{path} line {number}: '{key}' must be a {kind.__name__}, next to "
                                         "'messages'")
        if require_answer and "answer" not in row:
            raise FidelityInputError(f"{path} line {number}: a task needs a gold 'answer'")
        rows.append(row)
    if not rows:
        raise FidelityInputError(f"{path} holds no prompts")
    return rows


def read_tasks(spec: str, per_task: int) -> list[dict]:
    """`--tasks`: a JSONL of prompts that all carry gold answers, or `tiny`: the held-out examples of the bundled
    model's task generator (`mixquant.tiny.tasks`, seeds 0..per_task-1 of each task)."""
    if spec == "tiny":
        from mixquant.tiny import tasks

        return [example.to_row() for task in tasks.TASKS for example in tasks.heldout(task, per_task)]
    return read_prompts(spec, require_answer=True)


def tokenize(llm: LLM, rows: list[dict], enable_thinking: bool) -> list[Sample]:
    tokenizer = llm.get_tokenizer()
    samples = []
    for row in rows:
        if "messages" in row:
            kwargs = {"enable_thinking": enable_thinking, **row.get("chat_template_kwargs", {})}
            text = tokenizer.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=False,
                                                 add_generation_prompt=True, **kwargs)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template wrote the special tokens
        else:
            ids = llm.engine.tokenize(row["prompt"])  # as `LLM.generate` would for the text
        samples.append(Sample(ids, row.get("answer"), row.get("task")))
    return samples


def is_correct(text: str, answer: str) -> bool:
    """The gold answer appears in the generated text (both stripped), or is mathematically equal to its last
    `\\boxed{}` content ("0.5" for "\\frac{1}{2}")."""
    gold = answer.strip()
    if gold in text.strip():
        return True
    boxed = last_boxed(text)
    return boxed is not None and math_equal(gold, boxed)


def run_fidelity(model: str, pairs: list[str], rows: list[dict], max_tokens: int, enable_thinking: bool = False,
                 **engine_kwargs) -> FidelityResult:
    """Each pair on each prompt, one engine at a time (so one model's weights are in memory), reference first."""
    if pairs[0] != REFERENCE:
        raise ValueError(f"the reference {REFERENCE} runs first, got {pairs}")
    # Generation stops at EOS, as deployed: text after it would make accuracy (and divergence) meaningless.
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens)
    samples: list[Sample] = []
    reference_tokens: list[list[int]] = []
    reference_scores: list[torch.Tensor] = []  # [len(continuation) + 1, vocab] each, on the host
    result = FidelityResult(model, max_tokens)
    for index, pair in enumerate(pairs, start=1):
        print(f"mixquant fidelity: {pair} ({index}/{len(pairs)})", file=sys.stderr)
        prefill, decode = pair.split("/")
        llm = LLM(model, prefill_precision=prefill, decode_precision=decode, **engine_kwargs)
        if pair == REFERENCE:
            samples = tokenize(llm, rows, enable_thinking)
            reference = llm.generate([s.prompt_ids for s in samples], greedy, use_tqdm=False)
            reference_tokens = [list(o.outputs[0].token_ids) for o in reference]
            reference_scores = [llm.engine.teacher_forced_logprobs(s.prompt_ids, tokens).cpu()
                                for s, tokens in zip(samples, reference_tokens)]
        # The reference measures itself again like any pair (a second scoring run, a second generation that now
        # hits the prefix cache): anything but KL 0 and agreement 1 there is engine noise, or a bug here.
        outputs = [o.outputs[0] for o in llm.generate([s.prompt_ids for s in samples], greedy, use_tqdm=False)]
        records = []
        for sample, out, tokens, ref in zip(samples, outputs, reference_tokens, reference_scores):
            correct = None if sample.answer is None else is_correct(out.text, sample.answer)
            scores = llm.engine.teacher_forced_logprobs(sample.prompt_ids, tokens).cpu()
            records.append(PromptResult(
                prompt_tokens=len(sample.prompt_ids), task=sample.task, kl=kl_divergence(ref, scores).tolist(),
                top1_agreement=top1_agreement(ref, scores), first_divergence=first_divergence(tokens, out.token_ids),
                correct=correct, cut_off=correct is False and out.finish_reason == "length"))
        result.pairs[pair] = summarize(records)
        del llm, outputs
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def length_groups(records: list[PromptResult], prefix: str = "") -> dict[str, list[PromptResult]]:
    """Each length bucket present, when the records span more than one."""
    groups = {}
    for low, high, name in BUCKETS:
        members = [r for r in records if low <= r.prompt_tokens < high]
        if members and len(members) < len(records):
            groups[prefix + name] = members
    return groups


def summarize(records: list[PromptResult]) -> dict[str, Stats]:
    """'all' and its length buckets; then, for prompts that name a task, each task ('retrieval') and its length
    buckets ('retrieval 512-2k')."""
    groups = {ALL: records, **length_groups(records)}
    for task in dict.fromkeys(r.task for r in records if r.task is not None):
        members = [r for r in records if r.task == task]
        groups[task] = members
        groups.update(length_groups(members, prefix=f"{task} "))
    return {name: bucket_stats(members) for name, members in groups.items()}


def bucket_stats(records: list[PromptResult]) -> Stats:
    kl = [v for r in records for v in r.kl]
    # per token, like KL: a prompt with a longer continuation weighs more
    agreement = sum(r.top1_agreement * len(r.kl) for r in records) / len(kl)
    stats = Stats(n=len(records), kl_mean=statistics.fmean(kl), kl_p99=percentile(kl, 99),
                  top1_agreement=agreement,
                  first_divergence_mean=statistics.fmean(r.first_divergence for r in records))
    graded = [r.correct for r in records if r.correct is not None]
    if graded:
        stats.accuracy, stats.accuracy_n = sum(graded) / len(graded), len(graded)
        stats.accuracy_ci95 = wilson_interval(sum(graded), len(graded))
        stats.accuracy_cut_off = sum(r.cut_off for r in records)
    return stats


def markdown(result: FidelityResult) -> str:
    lines = [f"Against {REFERENCE} on {result.model}, greedy, up to {result.max_tokens} generated tokens.", "",
             "| pair | prompts (task, prompt tokens) | n | KL mean | KL p99 | top-1 agreement | first divergence "
             "| accuracy (95% CI) |",
             "|---|---|---|---|---|---|---|---|"]
    for pair, groups in result.pairs.items():
        for group in result.groups:
            if (s := groups.get(group)) is None:
                continue
            acc = "-" if s.accuracy is None else \
                f"{s.accuracy:.2f} ({s.accuracy_ci95[0]:.2f}-{s.accuracy_ci95[1]:.2f}, n={s.accuracy_n})"
            if s.mostly_cut_off:
                acc += f" **{s.accuracy_cut_off} cut off**"
            lines.append(f"| {pair} | {group} | {s.n} | {s.kl_mean:.3g} | {s.kl_p99:.3g} | "
                         f"{s.top1_agreement:.3f} | {s.first_divergence_mean:.1f} | {acc} |")
    return "\n".join(lines + [""] + [f"**Warning:** {w}" for w in cut_off_warnings(result)]).rstrip()


def cut_off_warnings(result: FidelityResult) -> list[str]:
    """One line for each pair and task (or all prompts) where most graded generations ended at the token limit
    before their answer: that accuracy is the limit's, not the pair's."""
    warnings = []
    for pair, groups in result.pairs.items():
        for group, s in groups.items():
            if s.mostly_cut_off and (group == ALL or is_task(group)):
                warnings.append(f"{pair} {group}: {s.accuracy_cut_off} of {s.accuracy_n} graded generations reached "
                                f"the {result.max_tokens}-token limit before an answer; raise --max-tokens")
    return warnings


def figure(result: FidelityResult):
    """Two panels of bars, one series per task (or per length bucket when prompts name no task): mean KL, and
    accuracy (with its 95% interval) where the prompts have gold answers, else top-1 agreement. The series share
    one legend below the panels: inside either one it would cover bars that reach the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs, series = list(result.pairs), result.plotted_groups
    fig, (ax_kl, ax_right) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    width = 0.8 / len(series)
    for j, group in enumerate(series):
        xs = [i + j * width for i in range(len(pairs)) if group in result.pairs[pairs[i]]]
        stats = [result.pairs[p][group] for p in pairs if group in result.pairs[p]]
        ax_kl.bar(xs, [s.kl_mean for s in stats], width, label=group)
        if result.has_accuracy:
            graded = [(x, s) for x, s in zip(xs, stats) if s.accuracy is not None]
            errors = [[s.accuracy - s.accuracy_ci95[0] for _, s in graded],
                      [s.accuracy_ci95[1] - s.accuracy for _, s in graded]]
            ax_right.bar([x for x, _ in graded], [s.accuracy for _, s in graded], width, yerr=errors, capsize=3)
        else:
            ax_right.bar(xs, [s.top1_agreement for s in stats], width)
    titles = ("mean KL to bf16/bf16 (teacher-forced)",
              "accuracy (95% Wilson interval)" if result.has_accuracy else "top-1 agreement with bf16/bf16")
    for ax, title in zip((ax_kl, ax_right), titles):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(pairs))], pairs)
        ax.set_title(title)
    ax_right.set_ylim(0, 1.05)
    fig.legend(*ax_kl.get_legend_handles_labels(), loc="outside lower center", ncols=len(series),
               title="task" if series[0] not in BUCKET_NAMES + [ALL] else "prompt tokens")
    fig.suptitle(result.model)
    return fig


def plot(result: FidelityResult, path: Path):
    import matplotlib.pyplot as plt

    fig = figure(result)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: FidelityResult, output_dir: Path) -> str:
    """fidelity.json, fidelity.md and fidelity.png; returns the markdown."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "fidelity.json").write_text(json.dumps(result.to_dict(), indent=2))
    table = markdown(result)
    (output_dir / "fidelity.md").write_text(table + "\n")
    plot(result, output_dir / "fidelity.png")
    return table
