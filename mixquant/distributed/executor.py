"""Tensor parallelism over processes: the driver (rank 0, in the engine's process) and one worker per other rank.

The LLMEngine calls a MultiprocExecutor where it calls a ModelRunner at tensor_parallel_size 1. The scheduler, the
block manager and sampling stay in the driver. Each call the engine makes (a step's forward pass, the logits of
some rows, KV blocks) is a collective RPC, as vLLM's: the driver broadcasts the method's name and arguments (a
step's inputs on the host) over the control group, then every rank runs it on its own ModelRunner, whose layers'
collectives keep the ranks in step; each rank keeps its own hidden states, and the logits the driver computes are
the whole vocabulary's (the head gathers them). Results that differ per rank (its KV heads) are gathered to it.

Failure: a worker that dies ends the engine with an error naming it (its traceback where it raised one). gloo
notices a lost peer at once; a watchdog thread waits on the workers' process sentinels, records the death (so an
idle server reports it on /health too) and kills the other workers, which also unblocks the driver. Workers exit
when the driver goes away, whether it closed the executor or died. A closed, failed or collected executor leaves no
process behind.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import traceback
import weakref
from typing import NoReturn

import torch
import torch.distributed as dist

from mixquant.config import EngineConfig
from mixquant.distributed import parallel_state
from mixquant.engine.model_runner import ModelRunner, StepInputs

logger = logging.getLogger(__name__)

STORE_HOST = "127.0.0.1"
SHUTDOWN_GRACE_S = 10.0  # a worker told to stop gets this long to leave before it is killed
DEATH_NOTICE_S = 5.0  # after a failed collective, how long a dying worker may take to exit and be named


class WorkerDiedError(RuntimeError):
    """A rank of a tensor-parallel engine stopped; the engine cannot run any more."""


def to_device(value, device: torch.device):
    """A step's inputs (dataclasses, lists and dicts of tensors) with every tensor on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: to_device(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


class Worker:
    """What each rank runs, the driver included: its ModelRunner, and the hidden states of its last forward pass."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.hidden: torch.Tensor | None = None
        self.kv_heads = runner.model.attention_layers()[0].kv_heads

    def forward(self, inputs: StepInputs):
        self.hidden = self.runner.forward(to_device(inputs, self.runner.device))

    def logits(self, rows: list[int]) -> torch.Tensor:
        return self.runner.logits(self.hidden, rows)

    def read_kv_blocks(self, block_ids: list[int]) -> tuple[slice, torch.Tensor]:
        return self.kv_heads, self.runner.read_kv_blocks(block_ids).cpu()

    def write_kv_blocks(self, block_ids: list[int], data: torch.Tensor):
        self.runner.write_kv_blocks(block_ids, data[..., self.kv_heads, :])


def _receive_call() -> tuple[str, tuple, bool] | None:
    call = [None]
    dist.broadcast_object_list(call, src=0, group=parallel_state.get_control_group())
    return call[0]


def _exit_when_orphaned(parent: int):
    """A worker whose driver died (killed, so it could not stop its ranks) exits rather than wait for it forever."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def worker_main(rank: int, store_port: int, config: EngineConfig, hf_config, dtype: torch.dtype, max_model_len: int,
                report: multiprocessing.connection.Connection):
    """A worker process: joins the group, builds its ModelRunner (loading its shard), then runs the driver's calls
    until told to stop. An error goes to the driver, which names it when it stops the engine."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process of the group; the driver stops us
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    size = config.tensor_parallel_size
    try:
        store = dist.TCPStore(STORE_HOST, store_port, size, is_master=False,
                              timeout=parallel_state.COLLECTIVE_TIMEOUT)
        store.set(f"worker-{rank}-started", "1")
        parallel_state.init_tensor_parallel(store, rank, size, config.device_obj)
        worker = Worker(ModelRunner(config, hf_config, dtype, max_model_len))
        while (call := _receive_call()) is not None:
            method, args, gather = call
            result = getattr(worker, method)(*args)
            if gather:
                dist.gather_object(result, None, dst=0, group=parallel_state.get_control_group())
    except BaseException:
        trace = traceback.format_exc()
        try:
            report.send(trace)
        except OSError:  # the driver is gone: nobody else will say it
            print(trace, flush=True)
        os._exit(1)  # not sys.exit: tearing down a broken process group could hang
    parallel_state.destroy_tensor_parallel()


class MultiprocExecutor:
    """A ModelRunner's interface over tensor_parallel_size ranks (see the module docstring)."""

    def __init__(self, config: EngineConfig, hf_config, dtype: torch.dtype, max_model_len: int):
        size = config.tensor_parallel_size
        self.failure: Exception | None = None  # why the engine stopped, once it has
        self._closing = False
        self._lock = threading.Lock()
        store = dist.TCPStore(STORE_HOST, 0, size, is_master=True, wait_for_workers=False,
                              timeout=parallel_state.COLLECTIVE_TIMEOUT)  # port 0: a free one, and no race for it
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: CUDA cannot be forked
        self.workers: list[multiprocessing.process.BaseProcess] = []
        self._reports: list[multiprocessing.connection.Connection] = []
        # the processes are stopped even if this object is only collected, or the interpreter exits
        self._stop_ranks = weakref.finalize(self, _stop_ranks, self.workers)
        for rank in range(1, size):
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(target=worker_main, name=f"mixquant-tp-rank-{rank}", daemon=True,
                                      args=(rank, store.port, config, hf_config, dtype, max_model_len, writer))
            process.start()
            writer.close()
            self.workers.append(process)
            self._reports.append(reader)
        try:
            self._wait_for_workers(store)
            parallel_state.init_tensor_parallel(store, 0, size, config.device_obj)
            self.worker = Worker(ModelRunner(config, hf_config, dtype, max_model_len))
        except BaseException as e:
            self._raise_after(e, "while the engine started")
        # holds no reference to the executor, which may then be collected (and its ranks stopped) while it waits
        threading.Thread(target=_watch, args=(weakref.ref(self), self.workers), name="mixquant-tp-watchdog",
                         daemon=True).start()

    def _wait_for_workers(self, store: dist.TCPStore):
        """Until every worker reached the group's rendezvous (it joins right after): one that died before it would
        otherwise leave the driver waiting for the store's timeout."""
        for rank, process in enumerate(self.workers, start=1):
            while not store.check([f"worker-{rank}-started"]):
                if not process.is_alive():
                    raise RuntimeError(f"tensor-parallel rank {rank} exited before it joined the group")
                time.sleep(0.05)

    # ---- the ModelRunner interface the engine uses ----------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.worker.runner.num_blocks

    def prepare(self, batch) -> StepInputs:
        return self.worker.runner.prepare(batch, device=torch.device("cpu"))  # broadcast from the host

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        self.collective_rpc("forward", inputs)
        return self.worker.hidden

    def logits(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        if hidden is not self.worker.hidden:
            raise RuntimeError("each rank keeps the hidden states of its last forward pass only: take the logits of "
                               "a step before the next one runs")
        return self.collective_rpc("logits", rows)

    def read_kv_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """The blocks' KV of every KV head, assembled from the ranks' heads."""
        parts = self.collective_rpc("read_kv_blocks", block_ids, gather=True)
        first = parts[0][1]
        kv = first.new_empty(*first.shape[:-2], max(heads.stop for heads, _ in parts), first.shape[-1])
        for heads, part in parts:
            kv[..., heads, :] = part
        return kv

    def write_kv_blocks(self, block_ids: list[int], data: torch.Tensor):
        self.collective_rpc("write_kv_blocks", block_ids, data.cpu())

    # ---- calls on every rank -----------------------------------------------------------------------------------------

    def collective_rpc(self, method: str, *args, gather: bool = False):
        """Runs Worker.`method`(*args) on every rank; returns the driver's result, or every rank's if `gather`."""
        if self.failure is not None:
            self.shutdown()  # where the watchdog found the death: the group is left here, not from its thread
            raise self.failure
        if self._closing:
            raise RuntimeError("this tensor-parallel engine has been closed")
        group = parallel_state.get_control_group()
        try:
            dist.broadcast_object_list([(method, args, gather)], src=0, group=group)
            result = getattr(self.worker, method)(*args)
            if not gather:
                return result
            results = [None] * (len(self.workers) + 1)
            dist.gather_object(result, results, dst=0, group=group)
            return results
        except BaseException as e:  # Ctrl-C too: the ranks are out of step now
            self._raise_after(e, f"during {method}")

    # ---- failure and shutdown ----------------------------------------------------------------------------------------

    def _raise_after(self, error: BaseException, when: str) -> NoReturn:
        """Stops every rank after a call failed on the driver, then raises the death of a worker where one died (a
        collective fails when a peer is lost), else the driver's own error."""
        if isinstance(error, RuntimeError):  # how collectives fail: give a dying peer the time to exit and be named
            multiprocessing.connection.wait([p.sentinel for p in self.workers], timeout=DEATH_NOTICE_S)
            self.record_death(f" {when}")
        own_error = self.failure is None
        if own_error:
            self.failure = RuntimeError(f"the engine stopped after rank 0 failed {when}: {type(error).__name__}: "
                                        f"{error}")
        self.shutdown()
        if own_error:
            raise error
        raise self.failure from error

    def record_death(self, when: str = ""):
        """Fails the engine with the first worker found dead, if it has not failed already."""
        with self._lock:
            # a sentinel is ready once the process has exited, which can be before it can be reaped (is_alive)
            exited = multiprocessing.connection.wait([p.sentinel for p in self.workers], timeout=0)
            dead = next((rank for rank, p in enumerate(self.workers, start=1) if p.sentinel in exited), None)
            if self.failure is None and dead is not None:
                self.failure = WorkerDiedError(f"{self._describe_death(dead)}{when}; the engine has stopped")
                logger.error("%s", self.failure)

    def _describe_death(self, rank: int) -> str:
        process = self.workers[rank - 1]
        process.join(timeout=DEATH_NOTICE_S)
        code = process.exitcode
        how = (f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exited with code {code}")
        report = self._reports[rank - 1]
        try:  # the worker's traceback, where it raised; a killed one said nothing (end of file)
            trace = report.recv() if report.poll(DEATH_NOTICE_S) else None
        except EOFError:
            trace = None
        if trace:
            logger.error("tensor-parallel rank %d failed:\n%s", rank, trace)
            how += f" after {trace.strip().splitlines()[-1]}"
        return f"tensor-parallel rank {rank} (pid {process.pid}) {how}"

    def shutdown(self):
        """Stops every rank (asking the workers first where they still listen) and leaves the process group; the
        executor cannot be used afterwards."""
        if self._closing:
            return
        self._closing = True
        if self.failure is None and parallel_state.is_tensor_parallel_initialized():
            try:
                dist.broadcast_object_list([None], src=0, group=parallel_state.get_control_group())
            except RuntimeError:  # a worker is already gone; the ones left are killed below
                pass
            deadline = time.monotonic() + SHUTDOWN_GRACE_S
            for process in self.workers:
                process.join(timeout=max(0.0, deadline - time.monotonic()))
        self._stop_ranks()


def _watch(executor_ref: weakref.ref, workers: list[multiprocessing.process.BaseProcess]):
    """The watchdog: the first worker to exit while the engine runs fails it, and the others are stopped (so that
    what waits on the dead rank fails rather than hangs)."""
    multiprocessing.connection.wait([p.sentinel for p in workers])
    executor = executor_ref()
    if executor is None or executor._closing:
        return
    executor.record_death()
    for process in workers:
        process.kill()
    if executor.worker.runner.device.type == "cuda":
        dist.distributed_c10d._abort_process_group()  # NCCL would wait for the dead rank until its timeout


def _stop_ranks(workers: list[multiprocessing.process.BaseProcess]):
    """Kills the workers still running, reaps them all, and leaves the process group."""
    for process in workers:
        if process.is_alive():
            process.kill()
        process.join()
    parallel_state.destroy_tensor_parallel()
