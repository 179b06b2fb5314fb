"""`mixquant generate`: one completion from the command line."""
from __future__ import annotations

import sys

from mixquant import tiny
from mixquant.config import PRECISIONS


def add_engine_arguments(p):
    """Engine flags shared by every command that builds an engine (named as in `vllm serve`)."""
    p.add_argument("--prefill-precision", default="auto", choices=["auto", *PRECISIONS])
    p.add_argument("--decode-precision", default="bf16", choices=PRECISIONS)
    p.add_argument("--prefill-model", help="pre-quantized compressed-tensors checkpoint for the prefill phase")
    p.add_argument("--tokenizer")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="split the model over N GPUs (CPU processes with --device cpu)")


def engine_kwargs(args) -> dict:
    return dict(prefill_precision=args.prefill_precision, decode_precision=args.decode_precision,
                prefill_model=args.prefill_model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
                max_model_len=args.max_model_len, seed=args.seed, tensor_parallel_size=args.tensor_parallel_size)


def register(subparsers):
    p = subparsers.add_parser("generate", help="print one completion of a prompt")
    p.add_argument("--model", default=tiny.NAME,
                   help=f"checkpoint folder or Hugging Face id (default: {tiny.NAME}, the bundled model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    template = p.add_mutually_exclusive_group()
    template.add_argument("--raw", action="store_true",
                          help="complete the prompt text as it is (default: wrap it in the model's chat template "
                               "as one user message when the tokenizer has a template and the prompt holds none "
                               "of its special tokens)")
    template.add_argument("--chat", action="store_true",
                          help="always wrap the prompt in the chat template; an error if the tokenizer has none")
    add_engine_arguments(p)
    p.set_defaults(func=run)


def uses_chat_template(args, tokenizer) -> bool:
    """As `vllm chat` and `LLM.chat` users expect of a chat model, unless --raw, or the prompt is already
    formatted (it holds a special token such as <|im_start|>)."""
    if args.raw:
        return False
    if not tokenizer.chat_template:
        if args.chat:
            raise ValueError(f"--chat: the tokenizer of {args.tokenizer or args.model} has no chat template")
        return False
    return args.chat or not any(token in args.prompt for token in tokenizer.all_special_tokens)


def run(args) -> int:
    from mixquant import LLM, SamplingParams

    llm = LLM(args.model, **engine_kwargs(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    try:
        chat = uses_chat_template(args, llm.get_tokenizer())
    except ValueError as error:
        print(f"mixquant generate: {error}", file=sys.stderr)
        return 2
    if chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    else:
        out = llm.generate(args.prompt, params, use_tqdm=False)
    print(out[0].outputs[0].text)
    return 0
