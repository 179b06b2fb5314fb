"""The byte-level BPE tokenizer of `mixquant-tiny`, trained on the task generator's text.

It pre-tokenizes like Qwen3 (the same split pattern: digits one by one, NFC, byte-level), carries Qwen3's chat
special tokens, and ships Qwen3's chat template (checkpoint/chat_template.jinja, Apache-2.0, Qwen team), so
the server's template handling, the qwen3 reasoning parser and the hermes tool parser see what they see with Qwen3.

    python -m training.tokenizer OUT_DIR    # writes tokenizer.json, tokenizer_config.json, chat_template.jinja
"""
from __future__ import annotations

import argparse
import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from mixquant.tiny import bundled_model_path, tasks

QWEN3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Added but not special, as in Qwen3: they survive skip_special_tokens, so parsers find them in the output text.
MARKUP_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
# An upper bound: the tasks' words are few, so merges run out first (about 1.3k tokens).
MAX_VOCAB_SIZE = 4096
CHAT_TEMPLATE = (bundled_model_path() / "chat_template.jinja").read_text()
CORPUS_SEED_BASE = 1 << 50  # corpus seeds are neither evaluation nor training seeds


def corpus(count_per_task: int):
    """Rendered conversations of every task, the text the tokenizer is fitted to."""
    from jinja2 import Environment

    environment = Environment(trim_blocks=True, lstrip_blocks=True)
    environment.filters["tojson"] = json.dumps  # as transformers renders chat templates
    template = environment.from_string(CHAT_TEMPLATE)
    for task in tasks.TASKS:
        for i in range(count_per_task):
            example = tasks.generate(task, CORPUS_SEED_BASE + i)
            yield template.render(messages=example.messages, tools=example.tools)


def build(count_per_task: int = 500):
    """A transformers fast tokenizer, ready for save_pretrained."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=MAX_VOCAB_SIZE - len(MARKUP_TOKENS), special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus(count_per_task), trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=4096, clean_up_tokenization_spaces=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("--examples-per-task", type=int, default=500)
    args = parser.parse_args(argv)
    build(args.examples_per_task).save_pretrained(args.output_dir)
    print(f"tokenizer written to {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
