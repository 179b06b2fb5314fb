"""A CPU experiment: does a plain copy task teach a small model to pick a name's line? (docs/tiny-model.md)

    python -m training.copy_experiment --arm answers|copy [--steps 2000] [--records 2 | --records 2:1250,8:2250]

A 4-layer, 128-wide Qwen3 model trained from scratch on name-by-id questions over lists of `--records` records,
alone (`answers`) or mixed half and half with "Repeat the records as listed." (`copy`); loss on the answers only,
as in train.py. `--records` may be a curriculum, list sizes with the steps each is trained for, in order (the
steps then add up to the run's length; one cosine schedule spans them). Every 250 steps it prints the
teacher-forced accuracy on the first-name and last-name tokens of 200 held-out answers for each list size of the
run. A model that copies a name from a random one of two lines scores 0.5 on each.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from functools import partial
from multiprocessing import Pool

import torch

from mixquant.tiny import bundled_model_path, tasks
from training.train import PackedStream, encode, field_span, forward, stages

ROWS, ROW_LEN, POOL_CHUNKS, CHUNK = 16, 384, 10, 2000
QUESTIONS = {"answers": ("name_by_id",), "copy": ("name_by_id", "all_lines")}


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bundled_model_path()))


def encode_chunk(job: tuple[int, int, str, int]) -> list[tuple[list[int], int]]:
    start, count, kind, records = job
    tok = tokenizer()
    return [encode(tok, tasks.generate("retrieval", tasks.TRAIN_SEED_BASE + s, max_records=records, kinds=(kind,)),
                   False) for s in range(start, start + count)]


def example_pools(kinds: tuple[str, ...], records: int) -> dict[str, list]:
    """20,000 encoded training examples of each question kind (seeds apart by 10^6 between kinds)."""
    jobs = [(i * CHUNK + 10**6 * k, CHUNK, kind, records) for k, kind in enumerate(kinds) for i in range(POOL_CHUNKS)]
    with Pool(2) as pool:
        chunks = pool.map(encode_chunk, jobs)
    return {kind: [x for job, chunk in zip(jobs, chunks) if job[2] == kind for x in chunk] for kind in kinds}


def packed_batch(rng: random.Random, pools: dict[str, list], pad_id: int) -> dict[str, torch.Tensor]:
    """ROWS rows of whole examples (kinds drawn evenly), packed as train.py packs them."""
    kinds, rows = list(pools), []
    for _ in range(ROWS):
        row, used = [], 0
        while True:
            x, start = rng.choice(pools[rng.choice(kinds)])
            if used + len(x) > ROW_LEN:
                break
            row.append((x, start, tasks.TASKS.index("retrieval")))
            used += len(x)
        rows.append(PackedStream.pack(row, pad_id, ROW_LEN))
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def name_accuracy(model, tok, heldout: list[tuple[list[int], int]]) -> dict[str, float]:
    """Teacher-forced argmax on each answer's first- and last-name token (the tokens after ' name')."""
    model.eval()
    first = last = both = 0
    with torch.no_grad():
        for x, start in heldout:
            predicted = model(input_ids=torch.tensor([x])).logits[0, start - 1:-1].argmax(-1).tolist()
            answer = x[start:]
            i = field_span(tok, answer, "name")[0]
            f, l = predicted[i] == answer[i], predicted[i + 1] == answer[i + 1]
            first, last, both = first + f, last + l, both + (f and l)
    model.train()
    n = len(heldout)
    return {"first": first / n, "last": last / n, "both": both / n, "last|first": both / max(first, 1)}


def main(argv: list[str] | None = None) -> int:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", choices=sorted(QUESTIONS), required=True)
    parser.add_argument("--steps", type=int, default=2000, help="the run's length, unless --records has stages")
    parser.add_argument("--records", type=partial(stages, share=int), default=[(2, None)],
                        metavar="N | N:STEPS,N:STEPS,...")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    plan = [(records, steps or args.steps) for records, steps in args.records]
    total_steps = sum(steps for _, steps in plan)
    torch.manual_seed(0)
    tok = tokenizer()
    stage_pools = [example_pools(QUESTIONS[args.arm], records) for records, _ in plan]
    heldout = {records: [encode(tok, e, False) for e in tasks.heldout("retrieval", 200, max_records=records,
                                                                       kinds=("name_by_id",))]
               for records, _ in plan}
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=1408, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, rope_theta=10000.0,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id))
    model.config._attn_implementation = "sdpa"
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng, start = random.Random(0), time.time()
    stage_ends = [sum(steps for _, steps in plan[:i + 1]) for i in range(len(plan))]
    for step in range(1, total_steps + 1):
        lr = args.lr * min(1, step / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total_steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        stage = next(i for i, end in enumerate(stage_ends) if step <= end)
        batch = packed_batch(rng, stage_pools[stage], tok.pad_token_id)
        logits = forward(model, batch, dense_mask=True)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 250 == 0 or step == total_steps:
            scores = {records: name_accuracy(model, tok, examples) for records, examples in heldout.items()}
            # one size: flat keys, as the runs in docs/tiny-model.md printed them; several: one dict each
            scores = ({k: round(v, 3) for k, v in scores[plan[0][0]].items()} if len(scores) == 1 else
                      {f"records_{n}": {k: round(v, 3) for k, v in by.items()} for n, by in scores.items()})
            print(json.dumps({"arm": args.arm, "step": step, "records": plan[stage][0],
                              "s": round(time.time() - start), "loss": round(loss.item(), 3), **scores}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
