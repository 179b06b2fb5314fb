"""`mixquant generate`: a plain prompt to a chat model goes through its chat template unless --raw (CPU)."""
from __future__ import annotations

import argparse
import json
import shutil

import pytest
from transformers import AutoTokenizer

from mixquant.cli import main
from mixquant.entrypoints.generate import uses_chat_template
from mixquant.tiny import bundled_model_path, tasks


def options(prompt: str, raw: bool = False, chat: bool = False) -> argparse.Namespace:
    return argparse.Namespace(prompt=prompt, raw=raw, chat=chat, model="m", tokenizer=None)


@pytest.fixture(scope="module")
def chat_tokenizer():
    return AutoTokenizer.from_pretrained(str(bundled_model_path()))


@pytest.fixture
def plain_tokenizer(tiny_qwen3, tmp_path):
    """The Qwen3 tokenizer without its chat template, as a base model's."""
    config = json.loads((tiny_qwen3 / "tokenizer_config.json").read_text())
    del config["chat_template"]
    shutil.copy(tiny_qwen3 / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(str(tmp_path))


def test_the_chat_template_is_the_default_for_plain_text(chat_tokenizer):
    assert uses_chat_template(options("What is 2 + 2?"), chat_tokenizer)
    assert not uses_chat_template(options("What is 2 + 2?", raw=True), chat_tokenizer)
    # a prompt already written in the template's markup is completed as it is
    formatted = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert not uses_chat_template(options(formatted), chat_tokenizer)
    assert uses_chat_template(options(formatted, chat=True), chat_tokenizer)


def test_a_tokenizer_without_a_template_completes_raw(plain_tokenizer):
    assert not uses_chat_template(options("What is 2 + 2?"), plain_tokenizer)
    with pytest.raises(ValueError, match="--chat: the tokenizer of m has no chat template"):
        uses_chat_template(options("What is 2 + 2?", chat=True), plain_tokenizer)


def test_raw_and_chat_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "hi", "--raw", "--chat"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_the_bundled_model_answers_a_plain_prompt(capsys):
    example = tasks.generate("arithmetic", 5)  # two steps: its working and answer take 53 tokens
    argv = ["generate", "--prompt", example.messages[0]["content"], "--max-tokens", "64", "--device", "cpu"]
    assert main(argv) == 0
    chat = capsys.readouterr().out
    assert example.answer in chat and "</think>" in chat  # its working, then the boxed answer
    assert main([*argv, "--raw"]) == 0
    assert capsys.readouterr().out != chat
