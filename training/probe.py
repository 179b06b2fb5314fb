"""Which attention heads look a record's field up? For retrieval questions on short lists, the probability the model
gives the answer's first field token, and how much attention each head puts on that field's token in every record
line (the right one first) from the position that predicts it.

    python -m training.probe [MODEL] [--records 2] [--examples 2] [--kinds value_by_id,name_by_id]

transformers with eager attention is the reference here (it returns attention weights); MODEL defaults to the
bundled mixquant-tiny.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from mixquant.tiny import bundled_model_path, tasks
from training.train import encode

# The key each question kind answers after, and how many tokens after it the field starts (values: a space first)
FIELD_KEYS = {"value_by_id": (" value", 2), "name_by_id": (" name", 1), "city_by_name": (" city", 1)}


@dataclass
class Probe:
    p_answer: float  # probability of the answer's first field token
    attention: torch.Tensor  # [layers, heads, records]: attention on each line's field token, the right line first


def probe(model, tokenizer, kind: str, seed: int, records: int) -> Probe:
    key, offset = FIELD_KEYS[kind]
    example = tasks.generate("retrieval", seed, max_records=records, kinds=(kind,))
    ids, start = encode(tokenizer, example, enable_thinking=True)
    tokens = [tokenizer.decode([i]) for i in ids]
    target = start + tokens[start:].index(key) + offset
    # in a record line a key follows ':' or ','; in the question it does not
    fields = [i + offset for i in range(1, start) if tokens[i] == key and tokens[i - 1] in (":", ",")]
    right = next(f for f in fields if ids[f] == ids[target])
    order = [right] + [f for f in fields if f != right]
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True)
    attention = torch.stack([a[0, :, target - 1, order] for a in out.attentions])
    p_answer = out.logits[0, target - 1].softmax(-1)[ids[target]].item()
    return Probe(p_answer, attention)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=str(bundled_model_path()))
    parser.add_argument("--records", type=int, default=2)
    parser.add_argument("--examples", type=int, default=2)
    parser.add_argument("--kinds", default="value_by_id,name_by_id,city_by_name")
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager").eval()
    for kind in args.kinds.split(","):
        for i in range(args.examples):
            result = probe(model, tokenizer, kind, 10**8 + i, args.records)
            layer, head = divmod(int(result.attention[..., 0].argmax()), result.attention.shape[1])
            print(f"{kind} ({args.records} records): p(answer) {result.p_answer:.2f}; most attention on the right "
                  f"field: layer {layer} head {head}, {result.attention[layer, head, 0]:.2f} (other lines: "
                  f"{', '.join(f'{a:.2f}' for a in result.attention[layer, head, 1:].tolist())})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
