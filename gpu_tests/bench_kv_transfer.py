"""KV reads through the NIXL connector between two processes: a prefill side holding a model-shaped KV cache and a
decode side reading requests' blocks into its own, timed per request and checked byte for byte.

    UCX_TLS=tcp python gpu_tests/bench_kv_transfer.py                   # CPU: host memory over TCP on loopback
    python gpu_tests/bench_kv_transfer.py --device cuda --decode-device cuda:1   # GPU memory (one host)

The default shape is Qwen3-8B's KV (36 layers, 8 KV heads of 128, bf16): 144 KiB per token, 2.25 MiB per block.
It runs the connector as the engine does (side-channel handshake, block-indexed READs, the read notice that frees
the prefill side's blocks) without computing any model, so it measures the transport alone.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

import torch

from mixquant.distributed.kv_transfer import KVTransferConfig, RemotePrefill
from mixquant.distributed.nixl_connector import NixlConnector
from mixquant.engine.block_manager import BlockManager
from mixquant.engine.sequence import Sequence
from mixquant.sampling_params import SamplingParams

BLOCK_SIZE = 16


def kv_cache(args, device: str, fill: bool) -> torch.Tensor:
    """[2, layers, blocks + 1, block_size, kv_heads, head_dim], as ModelRunner lays it out; the prefill side's
    holds a pattern the decode side can check."""
    shape = (2, args.layers, args.blocks + 1, BLOCK_SIZE, args.kv_heads, args.head_dim)
    dtype = getattr(torch, args.dtype)
    if not fill:
        return torch.zeros(shape, dtype=dtype, device=device)
    block_ids = torch.arange(args.blocks + 1, device=device, dtype=torch.float32)
    return (block_ids.view(1, 1, -1, 1, 1, 1) % 251).expand(shape).to(dtype).contiguous()


def connector(args, role: str, cache: torch.Tensor, block_manager: BlockManager) -> NixlConnector:
    planes = [cache[kv, layer] for kv in range(2) for layer in range(cache.shape[1])]
    config = KVTransferConfig("NixlConnector", kv_role=role, kv_port=0)
    return NixlConnector(config, planes, [cache], BLOCK_SIZE, block_manager, "fp8")


def prefill_side(args, requests: mp.Queue, answers: mp.Queue):
    cache = kv_cache(args, args.device, fill=True)
    block_manager = BlockManager(args.blocks, BLOCK_SIZE, False, "fp8", "bf16")
    prefill = connector(args, "kv_producer", cache, block_manager)
    while (tokens := requests.get()) is not None:
        seq = Sequence(f"r{tokens}-{time.monotonic_ns()}", 0, list(range(tokens + 1)), SamplingParams(),
                       remote_decode=True)
        assert block_manager.allocate(seq), "raise --blocks"
        answers.put(prefill.hold(seq.request_id, seq.block_table, seq.token_ids[:tokens]))
        block_manager.free_sequence(seq)  # the connector holds them until they are read
        while prefill.busy:
            prefill.poll()
            prefill.idle()
    prefill.close()


def decode_side(args, sizes: list[int]) -> list[dict]:
    ctx = mp.get_context("spawn")
    requests, answers = ctx.Queue(), ctx.Queue()
    process = ctx.Process(target=prefill_side, args=(args, requests, answers))
    process.start()
    cache = kv_cache(args, args.decode_device or args.device, fill=False)
    block_manager = BlockManager(args.blocks, BLOCK_SIZE, False, "bf16", "bf16")
    decode = connector(args, "kv_consumer", cache, block_manager)
    rows = []
    try:
        for tokens in sizes:
            seconds = []
            for repeat in range(args.repeats + 1):  # the first read of all also makes the connection
                requests.put(tokens)
                remote = RemotePrefill.from_params(answers.get())
                seq = Sequence(f"d{tokens}-{repeat}", 0, list(range(tokens + 1)), SamplingParams(),
                               remote_prefill=remote)
                assert block_manager.allocate(seq)
                start = time.perf_counter()
                decode.load(seq, seq.block_table[:len(remote.block_ids)], remote.block_ids)
                while not (ended := decode.poll()):
                    decode.idle()  # as an engine step with nothing else to run
                elapsed = time.perf_counter() - start
                assert ended == [(seq, True)], f"the read failed: {decode.stats()}"
                local, expected = seq.block_table[:len(remote.block_ids)], torch.tensor(remote.block_ids) % 251
                got = cache[0, 0, local, 0, 0, 0].float().cpu()
                assert torch.equal(got, expected.float()), "the blocks read differ from the prefill side's"
                block_manager.free_sequence(seq)
                if repeat:
                    seconds.append(elapsed)
            nbytes = len(remote.block_ids) * decode.layout.bytes_per_block
            p50 = statistics.median(seconds)
            rows.append({"tokens": tokens, "blocks": len(remote.block_ids), "bytes": nbytes, "p50_s": p50,
                         "min_s": min(seconds), "gb_per_s": nbytes / p50 / 1e9})
            print(f"{tokens:>7} tokens  {nbytes / 2**20:9.1f} MiB  p50 {p50 * 1e3:8.2f} ms  "
                  f"min {min(seconds) * 1e3:8.2f} ms  {nbytes / p50 / 1e9:6.2f} GB/s", flush=True)
    finally:
        requests.put(None)
        process.join(timeout=60)
        decode.close()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="where the prefill side's KV cache lives")
    parser.add_argument("--decode-device", help="where the decode side's lives (default: --device)")
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--blocks", type=int, default=520, help="KV cache blocks on each side")
    parser.add_argument("--tokens", default="16,256,1024,4096,8192", help="prompt lengths to read")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", help="write the rows here as JSON")
    args = parser.parse_args()
    rows = decode_side(args, [int(n) for n in args.tokens.split(",")])
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
