"""The tensor-parallel process group of this process, and the collectives the layers call (vLLM's names).

One engine process (the driver, rank 0) and one worker process per further rank form the group; each process joins
it once, before it builds its model, so that layers read their rank and the group's size while they are built. At
tensor_parallel_size 1 no group exists and every collective returns its input: the single-device code path is
today's, and no layer of a model built at size 1 ever calls into torch.distributed.

Two groups: the device group carries the layers' all-reduces and all-gathers (NCCL on GPUs, gloo on CPU); the
control group (gloo, over the CPU) carries the driver's broadcast of each step's inputs. Workers idle in that
broadcast between requests, so its timeout is long; a dead peer is noticed by gloo (the connection closes) and by
the driver's watchdog (distributed/executor.py), not by a timeout.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

# A collective of a step that has not finished within this has lost a rank (NCCL gives no other sign of it).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
# Workers wait in the control group's broadcast for the next step: a server may stay idle for days.
CONTROL_TIMEOUT = timedelta(days=365)

_RANK, _SIZE = 0, 1
_DEVICE_GROUP: dist.ProcessGroup | None = None
_CONTROL_GROUP: dist.ProcessGroup | None = None


def init_tensor_parallel(store: dist.Store, rank: int, size: int, device: torch.device):
    """Joins this process to the group through `store` (the driver's TCPStore on a free localhost port)."""
    global _RANK, _SIZE, _DEVICE_GROUP, _CONTROL_GROUP
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(rank)  # rank r computes on the r-th visible GPU
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)
    _DEVICE_GROUP = dist.group.WORLD
    _CONTROL_GROUP = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    _RANK, _SIZE = rank, size


def destroy_tensor_parallel():
    global _RANK, _SIZE, _DEVICE_GROUP, _CONTROL_GROUP
    if _DEVICE_GROUP is not None:
        dist.destroy_process_group()
    _RANK, _SIZE, _DEVICE_GROUP, _CONTROL_GROUP = 0, 1, None, None


def is_tensor_parallel_initialized() -> bool:
    return _DEVICE_GROUP is not None


def check_no_tensor_parallel_engine():
    """Models are built for the group of their process, so no other engine may be built while one is up."""
    if _DEVICE_GROUP is not None:
        raise RuntimeError(f"a tensor-parallel engine (tensor_parallel_size={_SIZE}) is running in this process: "
                           "close it (LLMEngine.close) before building another engine")


def get_tp_rank() -> int:
    return _RANK


def get_tp_size() -> int:
    return _SIZE


def get_control_group() -> dist.ProcessGroup:
    return _CONTROL_GROUP


def tensor_model_parallel_all_reduce(x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """x summed (or reduced by `op`) over the ranks, in place; every rank gets the same bits."""
    if _SIZE > 1:
        dist.all_reduce(x, op=op, group=_DEVICE_GROUP)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The ranks' x concatenated along `dim`, rank after rank."""
    if _SIZE == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_SIZE)]
    dist.all_gather(parts, x.contiguous(), group=_DEVICE_GROUP)
    return torch.cat(parts, dim=dim)


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Elementwise max over the ranks (quantization statistics of a tensor split across them)."""
    return tensor_model_parallel_all_reduce(x, dist.ReduceOp.MAX)


def min_over_ranks(value: int) -> int:
    """The smallest of the ranks' values (sizes every rank must agree on, such as the KV cache's blocks)."""
    if _SIZE == 1:
        return value
    smallest = torch.tensor([value])
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN, group=_CONTROL_GROUP)
    return int(smallest)


def tp_partition(total: int, what: str, replicas: int = 1) -> slice:
    """This rank's part of `total` units (rows, heads, vocab entries) split evenly over the ranks, `replicas` ranks
    holding each part (KV heads fewer than the ranks); a ValueError names `what` where they do not split evenly."""
    parts = _SIZE // replicas
    if total % parts:
        raise ValueError(f"{what}: {total} do not split into {parts} equal parts (tensor_parallel_size={_SIZE})")
    size = total // parts
    start = _RANK // replicas * size
    return slice(start, start + size)


def kv_head_replicas(num_kv_heads: int, what: str) -> int:
    """How many ranks hold each KV head: 1 where the ranks split them, size / heads where there are fewer heads than
    ranks (each rank needs the KV heads of its query heads; vLLM replicates them the same way)."""
    if num_kv_heads >= _SIZE:
        return 1
    if _SIZE % num_kv_heads:
        raise ValueError(f"{what}: {num_kv_heads} KV heads can neither be split over nor replicated on "
                         f"tensor_parallel_size={_SIZE} ranks")
    return _SIZE // num_kv_heads
