"""`mixquant serve MODEL`: the OpenAI-compatible server, with `vllm serve`'s flag names where they mean the same."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from mixquant import tiny
from mixquant.config import PRECISIONS, PREFILL_ATTENTIONS
from mixquant.server.parsers import REASONING_PARSERS, TOOL_CALL_PARSERS


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def register(subparsers):
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (like `vllm serve`)",
                              description=__doc__)
    p.add_argument("model", nargs="?", default=tiny.NAME,
                   help=f"checkpoint folder or Hugging Face id (default: {tiny.NAME}, the bundled model)")

    http = p.add_argument_group("server")
    http.add_argument("--host", default="127.0.0.1", help="address to bind (default: local connections only)")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--served-model-name", nargs="+", metavar="NAME",
                      help="names clients may use for the model (default: MODEL as given)")
    http.add_argument("--api-key", default=os.environ.get("MIXQUANT_API_KEY"),
                      help="require 'Authorization: Bearer KEY' on /v1 routes (default: $MIXQUANT_API_KEY)")
    http.add_argument("--chat-template", help="Jinja chat template, as a file or inline, replacing the tokenizer's")
    http.add_argument("--default-chat-template-kwargs", type=json_object, default={}, metavar="JSON",
                      help='chat template arguments requests start from, e.g. \'{"enable_thinking": false}\'')
    http.add_argument("--reasoning-parser", choices=sorted(REASONING_PARSERS),
                      help="split <think> reasoning into the message's `reasoning` field")
    http.add_argument("--tool-call-parser", choices=sorted(TOOL_CALL_PARSERS),
                      help="format of the tool calls the model writes")
    http.add_argument("--enable-auto-tool-choice", action="store_true",
                      help='parse tool calls from the output for tool_choice "auto" (needs --tool-call-parser)')
    http.add_argument("--generation-config", default="auto", metavar="auto|none|FOLDER",
                      help="sampling defaults: the model's generation_config.json (auto), none, or another folder's; "
                           "fields a request sets win")
    http.add_argument("--max-logprobs", type=int, default=20, help="most logprobs/top_logprobs a request may ask")
    http.add_argument("--max-pending-requests", type=int, default=8192,
                      help="requests held at once (running or queued); more are answered 503")
    http.add_argument("--max-request-bytes", type=int, default=32 << 20, help="largest request body accepted")
    http.add_argument("--shutdown-timeout", type=float, default=30.0,
                      help="seconds in-flight requests get to finish after SIGTERM before they are aborted")
    http.add_argument("--uvicorn-log-level", default="info",
                      choices=["critical", "error", "warning", "info", "debug", "trace"])

    engine = p.add_argument_group("engine")
    engine.add_argument("--tokenizer", help="tokenizer folder or id (default: the model's)")
    engine.add_argument("--prefill-model", help="pre-quantized compressed-tensors checkpoint for the prefill phase "
                                                "(with kv_role kv_producer, the only weights loaded; MODEL then only "
                                                "names the model)")
    engine.add_argument("--prefill-precision", default="auto", choices=["auto", *PRECISIONS],
                        help="precision of prompt tokens (auto: nvfp4 on Blackwell, fp8 on Ada/Hopper, else bf16)")
    engine.add_argument("--decode-precision", default="bf16", choices=PRECISIONS,
                        help="precision of generated tokens")
    engine.add_argument("--prefill-attention", default="auto", choices=PREFILL_ATTENTIONS,
                        help="attention of uncached prompt tokens: auto (fp8-cudnn for fp8 prefill segments of "
                             "7,168 tokens or more where cuDNN can run it, else bf16), bf16 (SDPA), fp8 (FP8 Triton "
                             "kernel, per-tile scales; CUDA compute capability >= 8.9) or fp8-cudnn (cuDNN's FP8 flash "
                             "attention, per-tensor scales; >= 9.0, pip install 'mixquant[cudnn]')")
    engine.add_argument("--dtype", default="auto")
    engine.add_argument("--device", default="auto")
    engine.add_argument("--max-model-len", type=int)
    engine.add_argument("--hf-overrides", type=json_object, metavar="JSON",
                        help="merged into the model's config.json, e.g. a rope_scaling")
    engine.add_argument("--max-num-seqs", type=int, default=256)
    engine.add_argument("--max-num-batched-tokens", type=int, default=8192)
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    engine.add_argument("--state-snapshot-interval", type=int, default=0,
                        help="models with recurrent state (Qwen3.5): besides each prompt's end and the end of a "
                             "shared prefix, save the state every this many prompt tokens for prefix-cache hits to "
                             "resume at (a multiple of the block size; 0: not)")
    engine.add_argument("--num-state-snapshots", type=int,
                        help="state snapshots kept for prefix caching (default: --max-num-seqs; 0: no state reuse)")
    engine.add_argument("--seed", type=int, default=0)
    engine.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                        help="dummy: random weights in the checkpoint's shapes (benchmarks)")
    engine.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    engine.add_argument("--kv-transfer-config", type=json_object, metavar="JSON",
                        help='disaggregated prefill/decode (docs/distributed.md), vLLM\'s JSON: '
                             '\'{"kv_connector": "NixlConnector", "kv_role": "kv_both"}\'; kv_producer only '
                             'prefills, kv_consumer only decodes; kv_ip and kv_port: the NIXL side channel')
    engine.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                        help="split the model over N GPUs (CPU processes with --device cpu), one process each")
    p.set_defaults(func=serve)
    register_proxy(subparsers)


def register_proxy(subparsers):
    # registered here so that `mixquant bench` and the rest parse on machines without the server's dependencies
    p = subparsers.add_parser("proxy", help="one OpenAI endpoint in front of prefill and decode instances "
                                            "(vLLM's disaggregated proxy protocol; docs/distributed.md)",
                              description="One OpenAI endpoint in front of prefill and decode instances: each "
                                          "request is prefilled on the next prefill instance and decoded on the next "
                                          "decode instance (vLLM's disaggregated proxy protocol; docs/distributed.md).")
    p.add_argument("--prefill", nargs="+", default=[], metavar="URL",
                   help="prefill instances (mixquant serve --kv-transfer-config ...), e.g. http://127.0.0.1:8100; "
                        "none: requests go round-robin to the decode instances unchanged")
    p.add_argument("--decode", nargs="+", required=True, metavar="URL", help="decode instances")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local connections only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    p.set_defaults(func=proxy)


def proxy(args) -> int:
    from mixquant.server.proxy import run_proxy

    return run_proxy(args)


def serve(args) -> int:
    from mixquant.server.config import load_chat_template

    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        print("mixquant serve: --enable-auto-tool-choice needs --tool-call-parser", file=sys.stderr)
        return 2
    try:
        chat_template = load_chat_template(args.chat_template)
        return run_server(args, chat_template)
    except ValueError as e:  # bad model, flags that contradict each other, ...: the message says which
        print(f"mixquant serve: {e}", file=sys.stderr)
        return 2


def run_server(args, chat_template: str | None) -> int:
    import uvicorn

    from mixquant.config import EngineConfig
    from mixquant.distributed.kv_transfer import KVTransferConfig
    from mixquant.engine.llm_engine import LLMEngine
    from mixquant.server.app import build_app
    from mixquant.server.config import ServerConfig, load_generation_defaults

    engine = LLMEngine(EngineConfig(
        model=args.model, tokenizer=args.tokenizer, prefill_model=args.prefill_model,
        prefill_precision=args.prefill_precision, decode_precision=args.decode_precision,
        prefill_attention=args.prefill_attention, dtype=args.dtype,
        device=args.device, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching, hf_overrides=args.hf_overrides, seed=args.seed,
        load_format=args.load_format, enforce_eager=args.enforce_eager,
        state_snapshot_interval=args.state_snapshot_interval, num_state_snapshots=args.num_state_snapshots,
        kv_transfer_config=KVTransferConfig.from_dict(args.kv_transfer_config) if args.kv_transfer_config else None,
        tensor_parallel_size=args.tensor_parallel_size))
    config = ServerConfig(
        served_model_names=args.served_model_name or [args.model], model_path=str(engine.model_path),
        api_key=args.api_key, chat_template=chat_template,
        default_chat_template_kwargs=args.default_chat_template_kwargs, reasoning_parser=args.reasoning_parser,
        tool_call_parser=args.tool_call_parser, enable_auto_tool_choice=args.enable_auto_tool_choice,
        generation_defaults=load_generation_defaults(args.generation_config, engine.generation_defaults),
        max_logprobs=args.max_logprobs, max_pending_requests=args.max_pending_requests,
        max_request_bytes=args.max_request_bytes)
    print(startup_line(engine, config, args.host, args.port), flush=True)
    server = uvicorn.Server(uvicorn.Config(build_app(engine, config), host=args.host, port=args.port,
                                           log_level=args.uvicorn_log_level,
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the handler that was
    # installed before it. Leaving a no-op one there makes that graceful shutdown end with exit code 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        engine.close()  # the ranks of a tensor-parallel engine stop with the server
    return 0


def startup_line(engine, config, host: str, port: int) -> str:
    precisions = engine.config.describe_precisions()
    nvfp4 = f"NVFP4 {precisions['nvfp4']}" if precisions["nvfp4"] else "NVFP4 unused"
    names = ", ".join(config.served_model_names)
    attention, min_tokens = engine.config.prefill_attention, engine.config.fp8_attention_min_tokens
    attention = (f" | prefill attention {attention}{f' from {min_tokens:,} tokens' if min_tokens else ''}"
                 if attention != "bf16" else "")
    if engine.config.fp8_attention_missing:  # measured on an H200, docs/benchmarks.md (cuDNN's FP8 flash attention)
        attention = (f" | prefill attention bf16: FP8 attention is off because {engine.config.fp8_attention_missing}"
                     f"; on an H200 fp8/bf16 prefill at 32k tokens ran 1.29x bf16/bf16 without it, 1.54x with it")
    ranks = engine.config.tensor_parallel_size
    parallel = f" | tensor parallel {ranks}" if ranks > 1 else ""
    decode = "none (prefill only)" if engine.config.prefill_only else \
        f"{precisions['decode_precision']} ({precisions['decode_kernels']})"
    return (f"mixquant serve: {names} ({config.model_path}){parallel} | prefill {precisions['prefill_precision']} "
            f"({precisions['prefill_kernels']}){attention} | decode {decode} | {nvfp4} | "
            f"KV cache {engine.kv_cache_tokens():,} tokens | max_model_len {engine.max_model_len}"
            f"{kv_transfer_line(engine)} | http://{host}:{port}/v1")


def kv_transfer_line(engine) -> str:
    connector = engine.kv_connector
    if connector is None:
        return ""
    role = engine.config.kv_transfer_config.kv_role
    side_channel = (f", side channel {engine.config.kv_transfer_config.kv_ip}:{connector.side_channel_port}"
                    if connector.side_channel else "")
    return f" | {role} over NIXL{side_channel}"
