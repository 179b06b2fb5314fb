"""Train `mixquant-tiny` on the task generator's stream, from scratch or on from a checkpoint (one GPU).

    python -m training.train --output-dir OUT [--minutes 7] [--batch-rows 32] [--init-from CHECKPOINT]

One run fits a 10-minute device call; the bundled weights took six (training/README.md gives the commands).

Conversations are rendered with the chat template exactly as the server renders a request (the prompt with its
generation prompt, tokenized alone) followed by the assistant turn the model must write; only that turn carries
loss. Examples are packed into rows of 4,096 tokens with a document mask (FlexAttention), so no token attends
across examples. transformers' Qwen3ForCausalLM is the model; bf16 autocast over fp32 weights, AdamW, warm-up then
cosine decay over the time budget. OUT receives the checkpoint (BF16 safetensors, config, generation config,
tokenizer), train_log.jsonl (loss per task, tokens/s) and loss.png.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mixquant.tiny import bundled_model_path, tasks

SEQ_LEN = 4096
NO_THINK_FRACTION = 0.3  # prompts rendered with enable_thinking=False, for tasks that need no working
# Examples drawn per task. Tool calls are learned first and fastest; record lookup (an induction over multi-token
# ids) and carrying digits take the most examples. Short record lists teach the lookup sooner: half of the
# retrieval examples are capped at fewer records than evaluation uses. Multi-turn recall (records and tool facts
# far back in a session) is the other slow one.
TRAIN_MIX = {"retrieval": 0.4, "arithmetic": 0.25, "tool_use": 0.05, "multi_turn": 0.3}
# After phase 5 the model copied no name or city out of a record line, even from 5 records (docs/tiny-model.md).
# Lists of 1 and 2 records start a curriculum: with one line a field is copied with no line to pick, with two the
# copy must first tell the lines apart.
SHORT_RETRIEVAL = {"fraction": 0.5, "max_records": (1, 2, 4, 8, 16, 48)}
# Three in seven retrieval questions in training ask for whole record lines: after phase 4 the model copied the
# value after an id but not the fields after it (docs/tiny-model.md), and a whole-line quote is all copy; two in
# seven repeat the list itself, with which a small model on the CPU learned to pick a name's line in half the steps
# answer-only training took (docs/tiny-model.md).
TRAIN_QUESTION_KINDS = tasks.QUESTION_KINDS + ("lines_by_id", "all_lines", "all_lines")


def model_config(tokenizer, kv_heads: int = 2):
    """About 16M parameters (18M with 6 KV heads); 384 and 1024 are multiples of the FP8 (16) and NVFP4 (16) block
    sizes."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=-(-len(tokenizer) // 128) * 128, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, hidden_size=384, intermediate_size=1024, num_hidden_layers=10,
        num_attention_heads=6, num_key_value_heads=kv_heads, head_dim=64, max_position_embeddings=SEQ_LEN,
        rope_theta=100000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, dtype="bfloat16")


def encode(tokenizer, example: tasks.Example, enable_thinking: bool) -> tuple[list[int], int]:
    """Token ids of prompt + answer turn, and where the answer starts (the prompt as the server tokenizes it)."""
    prompt = example.render_prompt(tokenizer, enable_thinking)
    full = tokenizer.apply_chat_template(example.messages, tools=example.tools, tokenize=False)
    if not full.startswith(prompt):
        raise RuntimeError(f"{example.task}: the rendered conversation does not extend its prompt")
    end = full.rindex("<|im_end|>") + len("<|im_end|>")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt):end], add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, len(prompt_ids)


class PackedStream(IterableDataset):
    """Rows of SEQ_LEN tokens packed from generated examples: input ids, next-token targets (-100 where no loss),
    positions restarting per example, the example index per token (for the document mask), the task per target."""

    def __init__(self, tokenizer_dir: str, seed: int, mix: dict[str, float] | None = None,
                 retrieval_kinds: tuple[str, ...] = TRAIN_QUESTION_KINDS, max_records: int | None = None,
                 shared_names: float = 0.0):
        self.tokenizer_dir, self.seed = tokenizer_dir, seed
        self.mix, self.retrieval_kinds, self.shared_names = mix or TRAIN_MIX, retrieval_kinds, shared_names
        # shared with the loader's worker processes, so a curriculum can raise the cap as training goes (0: none)
        self.record_cap = multiprocessing.RawValue("i", max_records or 0)

    def __iter__(self):
        from transformers import AutoTokenizer

        info = get_worker_info()
        worker = info.id if info else 0
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        rng = random.Random(self.seed * 1000 + worker)
        counter = 0
        row = []  # (ids, answer_start, task index)
        weights = [self.mix.get(t, 0.0) for t in tasks.TASKS]
        while True:
            task = rng.choices(range(len(tasks.TASKS)), weights)[0]
            sizes = {}
            if tasks.TASKS[task] == "retrieval":
                sizes["kinds"] = self.retrieval_kinds
                if self.shared_names:  # no draw otherwise: a run without the flag makes the examples it made before
                    sizes["shared_names"] = rng.random() < self.shared_names
                if rng.random() < SHORT_RETRIEVAL["fraction"]:
                    sizes["max_records"] = rng.choice(SHORT_RETRIEVAL["max_records"])
                if cap := self.record_cap.value:
                    sizes["max_records"] = min(sizes.get("max_records", cap), cap)
            seed = tasks.TRAIN_SEED_BASE + (self.seed * 1000 + worker) * (1 << 32) + counter
            example = tasks.generate(tasks.TASKS[task], seed, **sizes)
            counter += 1
            thinking = example.task == "arithmetic" or rng.random() >= NO_THINK_FRACTION
            ids, start = encode(tokenizer, example, thinking)
            if len(ids) > SEQ_LEN:
                continue
            if sum(len(r[0]) for r in row) + len(ids) > SEQ_LEN:
                yield self.pack(row, tokenizer.pad_token_id)
                row = []
            row.append((ids, start, task))

    @staticmethod
    def pack(row, pad_id: int, length: int = SEQ_LEN) -> dict[str, torch.Tensor]:
        input_ids = torch.full((length,), pad_id, dtype=torch.long)
        targets = torch.full((length,), -100, dtype=torch.long)
        positions = torch.zeros(length, dtype=torch.long)
        documents = torch.full((length,), len(row), dtype=torch.long)  # padding is its own document
        task_of_target = torch.full((length,), -1, dtype=torch.long)
        offset = 0
        for doc, (ids, start, task) in enumerate(row):
            n = len(ids)
            t = torch.tensor(ids)
            input_ids[offset:offset + n] = t
            positions[offset:offset + n] = torch.arange(n)
            documents[offset:offset + n] = doc
            # the token at position p predicts p + 1; answer tokens start at `start`
            targets[offset + start - 1:offset + n - 1] = t[start:]
            task_of_target[offset + start - 1:offset + n - 1] = task
            offset += n
        return {"input_ids": input_ids, "targets": targets, "positions": positions, "documents": documents,
                "task_of_target": task_of_target}


def attention_implementation(device: torch.device) -> str:
    # FlexAttention skips the blocks the document mask removes; it has no backward on CPU, where a dense mask
    # through SDPA does the same (slowly: CPU runs are for tests).
    return "flex_attention" if device.type == "cuda" else "sdpa"


def document_mask(documents: torch.Tensor, dense: bool):
    """Causal attention within each packed example: a FlexAttention block mask, or a dense boolean mask."""
    batch, length = documents.shape
    if dense:
        causal = torch.ones(length, length, dtype=torch.bool, device=documents.device).tril()
        return ((documents[:, :, None] == documents[:, None, :]) & causal)[:, None]
    from torch.nn.attention.flex_attention import create_block_mask

    def causal_within_document(b, h, q, k):
        return (documents[b, q] == documents[b, k]) & (q >= k)

    return create_block_mask(causal_within_document, batch, None, length, length, device=documents.device,
                             _compile=True)


def forward(model, batch: dict[str, torch.Tensor], dense_mask: bool) -> torch.Tensor:
    device = batch["input_ids"].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return model(input_ids=batch["input_ids"], position_ids=batch["positions"],
                     attention_mask=document_mask(batch["documents"], dense_mask)).logits


def parameter_groups(model, weight_decay: float = 0.1) -> list[dict]:
    """Weight decay on matrices only: decayed norm gains (QK-norm's above all) cap how sharply attention can pick
    one position out of thousands (after phase 5 the QK-norm gains had shrunk to 0.7-0.9)."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]


def learning_rate(progress: float, peak: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    if progress < warmup:
        return peak * progress / warmup
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup)))))


def schedule_span(text: str) -> tuple[float, float]:
    """`START:END`, the part of one learning-rate schedule a run covers (e.g. 0:0.34, 0.34:0.67, 0.67:1 for three
    chained device calls, each --init-from the one before), so that chained runs decay once instead of restarting."""
    try:
        start, end = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected START:END, e.g. 0.34:0.67") from None
    if not 0 <= start < end <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= START < END <= 1")
    return start, end


def task_mix(text: str) -> dict[str, float]:
    """`retrieval=1,arithmetic=0.2`: the tasks to train on and their weights (unnamed tasks: none)."""
    mix = {}
    for part in text.split(","):
        task, _, weight = part.partition("=")
        if task not in tasks.TASKS:
            raise argparse.ArgumentTypeError(f"{task!r}: not a task; the tasks are {', '.join(tasks.TASKS)}")
        try:
            mix[task] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: expected TASK=WEIGHT, e.g. retrieval=1") from None
        if mix[task] < 0:
            raise argparse.ArgumentTypeError(f"{part!r}: a weight cannot be negative")
    if not sum(mix.values()):
        raise argparse.ArgumentTypeError(f"{text!r}: no task has a weight")
    return mix


def stages(text: str, share: type) -> list[tuple[int, int | float | None]]:
    """`N` or `N:SHARE,N:SHARE,...`: list sizes in order, each with its share of a run (steps or a fraction)."""
    parsed = []
    for part in text.split(","):
        size, _, amount = part.partition(":")
        try:
            parsed.append((int(size), share(amount) if amount else None))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: expected N or N:{share.__name__.upper()}") from None
    if len(parsed) > 1 and any(amount is None for _, amount in parsed):
        raise argparse.ArgumentTypeError(f"give every stage of {text!r} its share, as in 2:0.25,8:0.75")
    if any(size < 1 or (amount is not None and amount <= 0) for size, amount in parsed):
        raise argparse.ArgumentTypeError(f"list sizes and shares must be positive in {text!r}")
    return parsed


def record_stages(text: str) -> list[tuple[int, float]]:
    """`--max-records`: one cap for the whole run (`8`), or caps that grow as it goes, each with the fraction of the
    run it holds for (`2:0.25,4:0.2,8:0.15,16:0.15,190:0.25`); the CPU experiment learned to look a name up only
    when its lists grew from two records (docs/tiny-model.md)."""
    parsed = [(size, 1.0 if fraction is None else fraction) for size, fraction in stages(text, float)]
    if abs(sum(fraction for _, fraction in parsed) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"the fractions of {text!r} must add up to 1")
    return parsed


def record_stage(schedule: list[tuple[int, float]], progress: float) -> int:
    """The stage whose share of the run `progress` falls in: the latest a stage can end (--advance-at ends it
    sooner)."""
    end = 0.0
    for index, (_, fraction) in enumerate(schedule):
        end += fraction
        if progress < end:
            return index
    return len(schedule) - 1


# The retrieval questions whose answer ends in one looked-up field, and what the check scores: the tokens after the
# field's name (`... name Mara Olsen.`, `Name Rosa Diaz, city Denver.`), the final period excluded.
CHECKABLE_KINDS = {"name_by_id": "name", "city_by_name": "city"}


def field_span(tokenizer, answer: list[int], field: str) -> tuple[int, int]:
    """Where the looked-up field lies in an answer's tokens: after its last `field` token, before the period."""
    words = [tokenizer.decode([t]).strip() for t in answer]
    start = max(j for j, w in enumerate(words) if w == field) + 1
    return start, next(j for j in range(start, len(words)) if words[j] == ".")


def lookup_check_rows(tokenizer, max_records: int, kinds: tuple[str, ...] = ("name_by_id",), count: int = 64
                      ) -> tuple[list[dict], list[tuple[int, int, int]]]:
    """`count` questions of `kinds` in turn over lists of up to `max_records` records, from the checks' own seeds,
    packed as training packs them; and, per question, its row and the target positions of its field."""
    rows, row, used, spans = [], [], 0, []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        example = tasks.generate("retrieval", tasks.CHECK_SEED_BASE + i, max_records=max_records, kinds=(kind,))
        ids, start = encode(tokenizer, example, enable_thinking=False)
        if used + len(ids) > SEQ_LEN:
            rows.append(row)
            row, used = [], 0
        first, end = field_span(tokenizer, ids[start:], CHECKABLE_KINDS[kind])
        spans.append((len(rows), used + start - 1 + first, used + start - 1 + end))
        row.append((ids, start, tasks.TASKS.index("retrieval")))
        used += len(ids)
    rows.append(row)
    return [PackedStream.pack(r, tokenizer.pad_token_id) for r in rows], spans


def lookups_right(model, rows: list[dict], spans: list[tuple[int, int, int]], rows_per_pass: int = 8) -> float:
    """Teacher-forced share of the questions whose every field token is the model's argmax. Through SDPA with a
    dense mask, as on the CPU, whatever training uses: a compiled FlexAttention would meet new shapes."""
    device = next(model.parameters()).device
    implementation, model.config._attn_implementation = model.config._attn_implementation, "sdpa"
    predicted, targets = [], []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), rows_per_pass):
            batch = {k: torch.stack([r[k] for r in rows[i:i + rows_per_pass]]).to(device) for k in rows[0]}
            predicted.append(forward(model, batch, dense_mask=True).argmax(-1).cpu())
            targets.append(batch["targets"].cpu())
    model.train()
    model.config._attn_implementation = implementation
    predicted, targets = torch.cat(predicted), torch.cat(targets)
    right = [bool((predicted[r, a:b] == targets[r, a:b]).all()) for r, a, b in spans]
    return sum(right) / len(right)


def check_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(text.split(","))
    for kind in kinds:
        if kind not in CHECKABLE_KINDS:
            raise argparse.ArgumentTypeError(f"{kind!r}: a check asks {' or '.join(CHECKABLE_KINDS)} questions")
    return kinds


def question_kinds(text: str) -> tuple[str, ...]:
    known = tasks.QUESTION_KINDS + tasks.TRAINING_ONLY_KINDS
    kinds = tuple(text.split(","))
    for kind in kinds:
        if kind not in known:
            raise argparse.ArgumentTypeError(f"{kind!r}: not a retrieval question; they are {', '.join(known)}")
    return kinds


def in_schedule(progress: float, span: tuple[float, float]) -> float:
    """Where a run that is `progress` of the way through its own budget stands in the shared schedule."""
    return span[0] + progress * (span[1] - span[0])


def restart_ramp(progress: float, span: tuple[float, float], warmup: float = 0.03) -> float:
    """A run that starts inside the schedule has a fresh AdamW all the same (a checkpoint carries no optimizer
    state), and a fresh Adam's first steps are as large as the learning rate whatever the gradient: it ramps up as a
    warm-up would."""
    return 1.0 if span[0] == 0 else min(1.0, progress / warmup)


def train(args) -> Path:
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    model = (Qwen3ForCausalLM.from_pretrained(args.init_from, dtype=torch.float32) if args.init_from
             else Qwen3ForCausalLM(model_config(tokenizer, args.kv_heads or 2))).to(device)
    model.config._attn_implementation = attention_implementation(device)
    dense_mask = model.config._attn_implementation != "flex_attention"
    model.train()
    params = sum(p.numel() for p in model.parameters())
    print(f"mixquant-tiny: {params / 1e6:.1f}M parameters, vocab {model.config.vocab_size}", flush=True)
    optimizer = torch.optim.AdamW(parameter_groups(model), lr=args.lr, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    caps = args.max_records or [(0, 1.0)]
    stage, checks = 0, {}  # checks: the packed check questions per cap, made once
    stream = PackedStream(args.tokenizer, args.seed, args.mix, args.retrieval_questions, caps[0][0],
                          args.shared_names)
    # each worker makes prefetch_factor batches ahead, so a raised cap reaches training that many steps late
    loader = DataLoader(stream, batch_size=args.batch_rows,
                        num_workers=args.workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if args.workers else None, persistent_workers=args.workers > 0)
    budget = args.minutes * 60
    log = (out / "train_log.jsonl").open("w")

    def write(record: dict):
        log.write(json.dumps(record) + "\n")
        log.flush()
        print(json.dumps(record), flush=True)

    start, step, tokens_seen = time.perf_counter(), 0, 0
    window = {"loss": torch.zeros(len(tasks.TASKS), device=device), "count": torch.zeros(len(tasks.TASKS),
                                                                                          device=device)}
    for batch in loader:
        elapsed = time.perf_counter() - start
        progress = max(elapsed / budget, step / args.max_steps if args.max_steps else 0.0)
        if progress >= 1:
            break
        stage = max(stage, record_stage(caps, progress))
        stream.record_cap.value = caps[stage][0]
        for group in optimizer.param_groups:
            group["lr"] = (learning_rate(in_schedule(progress, args.schedule), args.lr)
                           * restart_ramp(progress, args.schedule))
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        try:
            logits = forward(model, batch, dense_mask)
        except Exception as error:  # noqa: BLE001 - any FlexAttention build failure: train on, with SDPA
            if dense_mask or step:
                raise
            print(f"FlexAttention failed ({type(error).__name__}: {error}); SDPA with a dense mask instead",
                  flush=True)
            model.config._attn_implementation, dense_mask = "sdpa", True
            logits = forward(model, batch, dense_mask)
        per_token = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(),
                                                      reduction="none")
        mask = batch["targets"].flatten() != -100
        loss = per_token[mask].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            task = batch["task_of_target"].flatten()[mask]
            window["loss"].index_add_(0, task, per_token[mask].detach())
            window["count"].index_add_(0, task, torch.ones_like(task, dtype=torch.float32))
        step += 1
        tokens_seen += batch["input_ids"].numel()
        if args.advance_at and stage < len(caps) - 1 and step % args.check_every == 0:
            cap = caps[stage][0]
            if cap not in checks:
                checks[cap] = lookup_check_rows(tokenizer, cap, args.check_questions)
            right = lookups_right(model, *checks[cap])
            record = {"step": step, "tokens": tokens_seen, "check": {
                "max_records": cap, "questions": ",".join(args.check_questions), "right": round(right, 3)}}
            write(record)
            if right >= args.advance_at:
                stage += 1
        if step % args.log_every == 0:
            losses = (window["loss"] / window["count"].clamp(min=1)).tolist()
            seen = (window["count"] > 0).tolist()  # a task outside --mix has no loss to log
            elapsed = time.perf_counter() - start
            record = {"step": step, "elapsed_s": round(elapsed, 1), "tokens": tokens_seen,
                      "tokens_per_s": round(tokens_seen / elapsed), "lr": optimizer.param_groups[0]["lr"],
                      **({"max_records": stream.record_cap.value} if args.max_records else {}),
                      "loss": {t: round(v, 4) for t, v, any_ in zip(tasks.TASKS, losses, seen) if any_}}
            write(record)
            window["loss"].zero_()
            window["count"].zero_()
    log.close()
    print(f"trained {step} steps, {tokens_seen / 1e6:.0f}M tokens in {time.perf_counter() - start:.0f} s", flush=True)
    save(model, tokenizer, out)
    plot_loss([out / "train_log.jsonl"], out / "loss.png")
    return out


def save(model, tokenizer, out: Path):
    from transformers import GenerationConfig

    eos = [tokenizer.eos_token_id, tokenizer.pad_token_id]  # <|im_end|>, <|endoftext|>
    # A checkpoint continued from carries the shipped generation config, whose temperature 0 transformers refuses
    # to save: the model gets a plain greedy one, and temperature 0 (greedy for vLLM-style servers) is added after.
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                               do_sample=False)
    model.config._attn_implementation = "sdpa"
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0}, indent=2) + "\n")


def plot_loss(log_files: list[Path], path: Path):
    """Answer-token loss per task against training tokens; several logs are consecutive phases (--init-from)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    offset, points = 0, []
    for number, log_file in enumerate(log_files):
        records = [json.loads(line) for line in Path(log_file).read_text().splitlines()]
        points += [(offset + r["tokens"], r["loss"]) for r in records if "loss" in r]  # not the checks
        offset += records[-1]["tokens"] if records else 0  # a run shorter than one log interval logged nothing
        if number < len(log_files) - 1:
            ax.axvline(offset / 1e6, color="gray", linestyle=":", linewidth=1)
    for task in tasks.TASKS:
        logged = [(t / 1e6, loss[task]) for t, loss in points if task in loss]
        if logged:
            ax.plot(*zip(*logged), label=task)
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("answer-token loss")
    ax.set_title("mixquant-tiny training" + (" (dotted: a new phase)" if len(log_files) > 1 else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--tokenizer", default=str(bundled_model_path()),
                        help="tokenizer folder (default: the bundled model's)")
    parser.add_argument("--minutes", type=float, default=7.0, help="training time budget (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps too (0: no limit)")
    parser.add_argument("--batch-rows", type=int, default=32, help=f"rows of {SEQ_LEN} tokens per step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--schedule", type=schedule_span, default=(0.0, 1.0), metavar="START:END",
                        help="the part of one warm-up + cosine schedule this run covers (default: all of it)")
    parser.add_argument("--mix", type=task_mix, default=TRAIN_MIX, metavar="TASK=WEIGHT,...",
                        help=f"tasks and their weights (default: {','.join(f'{t}={w}' for t, w in TRAIN_MIX.items())})")
    parser.add_argument("--retrieval-questions", type=question_kinds, default=TRAIN_QUESTION_KINDS,
                        metavar="KIND,...", help="the retrieval questions to train on (default: every kind, "
                        "a third of them whole-line quotes)")
    parser.add_argument("--shared-names", type=float, default=0.0, metavar="FRACTION",
                        help="this share of retrieval lists draw their names from a few first and last names, "
                        "each recurring, so that only both words tell two people apart (default: none)")
    parser.add_argument("--max-records", type=record_stages, metavar="N | N:FRACTION,...",
                        help="cap retrieval's record lists at N records, or at caps that grow over the run "
                        "(e.g. 2:0.25,4:0.2,8:0.15,16:0.15,190:0.25)")
    parser.add_argument("--advance-at", type=float, metavar="ACCURACY",
                        help="end a --max-records stage early once this share of --check-questions at its cap "
                        "(teacher-forced, every token of the field asked for; seeds of their own) is right, checked "
                        "every --check-every steps; the stages' fractions are then the latest each may end")
    parser.add_argument("--check-questions", type=check_kinds, default=("name_by_id",), metavar="KIND,...",
                        help="what the --advance-at check asks, in turn: name_by_id, city_by_name (default: "
                        "name_by_id)")
    parser.add_argument("--check-every", type=int, default=100, help="steps between --advance-at checks")
    parser.add_argument("--init-from", help="continue from this checkpoint's weights (a fresh optimizer)")
    parser.add_argument("--kv-heads", type=int, help="KV heads of a model trained from scratch (of 6 query heads; "
                        "default 2, the shipped model's)")
    parser.add_argument("--workers", type=int, default=12, help="data generator processes")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.advance_at is not None and not (0 < args.advance_at <= 1 and args.max_records
                                            and len(args.max_records) > 1):
        parser.error("--advance-at takes an accuracy in (0, 1] and a --max-records curriculum of two or more stages")
    if not 0 <= args.shared_names <= 1:
        parser.error(f"--shared-names takes a share of retrieval lists in [0, 1], not {args.shared_names}")
    if args.init_from and args.kv_heads is not None:
        parser.error("--kv-heads shapes a model trained from scratch; --init-from takes the checkpoint's shape")
    train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
