"""KV blocks between a prefill and a decode instance over NIXL (vLLM's NixlConnector design, pared down).

The decode side pulls: it READs the prefill instance's blocks straight into freshly allocated blocks of its own paged
cache, one descriptor per (plane, block), with the prefill instance's request id as the notification that lets it
free them. Every instance registers its KV cache tensors with one NIXL agent at start-up (GPU memory on a GPU, host
memory on a CPU). An instance that prefills for others serves its agent's metadata and its cache's block layout on a
small HTTP side channel; a decode instance fetches them once per prefill instance, in a background thread, and
refuses layouts that differ from its own.

Only the engine thread calls the connector (like the engine, it is not thread-safe). Transfers progress meanwhile in
a thread that polls the agent every millisecond: over TCP a prefill instance's blocks are read only while its side
progresses, and NIXL's own progress thread would spin (its Python API gives it no delay), half a core per instance.
"""
from __future__ import annotations

import base64
import json
import logging
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import torch

from mixquant.distributed.kv_transfer import KVTransferConfig, RemotePrefill, remote_decode_params
from mixquant.engine.block_manager import BlockManager
from mixquant.engine.sequence import Sequence

logger = logging.getLogger(__name__)

METADATA_PATH = "/nixl/metadata"
IDLE_POLL_SECONDS = 0.001  # how long an engine step with nothing to compute waits for a transfer to move on
PROGRESS_SECONDS = 0.001  # between two polls of the agent by the progress thread
# vLLM's buckets for vllm:nixl_xfer_time_seconds
XFER_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0)
XFER_BYTES_BUCKETS = tuple(float(1 << k) for k in range(16, 36, 2))  # 64 KiB .. 16 GiB


@dataclass
class KVLayout:
    """Where each block of a KV cache lies: what a decode instance needs to read a prefill instance's blocks, and
    what both must share (the same block size, dtype and bytes per block of every plane)."""
    block_size: int
    dtype: str
    mem_type: str  # "DRAM" or "VRAM"
    planes: list[tuple[int, int, int, int, int]]  # (address, bytes between blocks, bytes of a block, blocks, device)

    @classmethod
    def of(cls, planes: list[torch.Tensor], block_size: int) -> KVLayout:
        for plane in planes:
            if not plane[0].is_contiguous():
                raise ValueError(f"a KV plane's blocks must each be contiguous, got strides {plane.stride()}")
        device = planes[0].device
        return cls(block_size, str(planes[0].dtype).removeprefix("torch."), "VRAM" if device.type == "cuda" else "DRAM",
                   [(p.data_ptr(), p.stride(0) * p.element_size(), p[0].numel() * p.element_size(), p.shape[0],
                     device.index or 0) for p in planes])

    @property
    def bytes_per_block(self) -> int:
        return sum(plane[2] for plane in self.planes)

    def descriptors(self) -> list[tuple[int, int, int]]:
        """(address, bytes, device) of every block of every plane, plane after plane."""
        return [(address + b * stride, length, device)
                for address, stride, length, blocks, device in self.planes for b in range(blocks)]

    def indices(self, block_ids: list[int]) -> list[int]:
        """Positions in descriptors() of the given blocks in every plane."""
        indices, offset = [], 0
        for *_, blocks, _ in self.planes:
            indices += [offset + b for b in block_ids]
            offset += blocks
        return indices

    def mismatch(self, other: KVLayout) -> str | None:
        """Why blocks of `other` cannot be copied into this layout's blocks (None if they can)."""
        mine = (self.block_size, self.dtype, [plane[2] for plane in self.planes])
        theirs = (other.block_size, other.dtype, [plane[2] for plane in other.planes])
        if mine != theirs:
            return (f"KV layouts differ (block size, dtype, bytes per block of each plane): here {mine[:2]} with "
                    f"{len(mine[2])} planes, there {theirs[:2]} with {len(theirs[2])} planes")
        return None


@dataclass
class Histogram:
    """Observations in cumulative buckets (Prometheus'), kept by the engine thread, read from its stats snapshots."""
    buckets: tuple[float, ...]
    counts: list[int] = field(init=False)  # observations <= each bound
    sum: float = 0.0
    count: int = 0

    def __post_init__(self):
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float):
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def snapshot(self) -> dict:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.sum, "count": self.count}


@dataclass
class _Peer:
    """A prefill instance as this decode instance knows it."""
    engine_id: str
    address: str  # its side channel's
    metadata: Future  # its side channel's answer
    agent_name: str | None = None
    layout: KVLayout | None = None
    dlist: object = None  # its blocks' descriptors, prepared for block-indexed reads
    error: str | None = None


@dataclass
class _Read:
    """One READ of a prefill instance's blocks into local ones, or with no blocks, a notice that they are not needed."""
    remote: RemotePrefill
    seq: Sequence | None  # None once nobody waits for it (aborted, or a release)
    local_blocks: list[int]
    remote_blocks: list[int]
    started: float
    peer: _Peer | None = None
    handle: object = None
    outcome: bool | str | None = None  # True: done; a reason: failed; None: in progress


@dataclass
class _Held:
    block_ids: list[int]
    deadline: float


class NixlConnector:
    def __init__(self, config: KVTransferConfig, planes: list[torch.Tensor], registered: list[torch.Tensor],
                 block_size: int, block_manager: BlockManager, kv_precision: str):
        """planes: the KV cache as ModelRunner.kv_block_planes() gives it; registered: the tensors they lie in."""
        try:
            from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t
        except ImportError as e:
            raise ValueError(f"the NIXL connector needs the nixl package ({e}): pip install 'mixquant[nixl]'") from e

        self.config = config
        self.block_manager = block_manager
        self.kv_precision = kv_precision
        self.layout = KVLayout.of(planes, block_size)
        # thread-safe (STRICT): the progress thread polls it beside the engine thread
        self.agent = nixl_agent(config.engine_id, nixl_agent_config(
            backends=config.backends, enable_prog_thread=False, sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT))
        self._registered = self.agent.register_memory(self.agent.get_reg_descs(registered))
        self._local_dlist = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", self.layout.descriptors(),
                                                       self.layout.mem_type)
        self._held: dict[str, _Held] = {}  # prefill side: request id -> blocks a decode instance has not read yet
        self._reads: list[_Read] = []  # decode side
        self._peers: dict[str, _Peer] = {}
        self._retired: list[_Peer] = []  # failed peers, removed once no read refers to them
        self._handshakes = ThreadPoolExecutor(max_workers=4, thread_name_prefix="nixl-handshake")
        self._notifications: queue.SimpleQueue[bytes] = queue.SimpleQueue()  # read notices, from the progress thread
        self._closed = threading.Event()
        self._progress_thread = threading.Thread(target=self._progress, name="nixl-progress", daemon=True)
        self._progress_thread.start()
        self.side_channel: ThreadingHTTPServer | None = None
        if config.prefills_for_others:
            self.side_channel = self._serve_metadata()
        self.blocks_read = 0
        self.failed_reads = 0
        self.expired_requests = 0
        self.fallbacks: Counter[str] = Counter()
        self.read_seconds = Histogram(XFER_TIME_BUCKETS)
        self.read_bytes = Histogram(XFER_BYTES_BUCKETS)

    @property
    def side_channel_port(self) -> int:
        return self.side_channel.server_address[1]

    @property
    def busy(self) -> bool:
        """Blocks held for a decode instance, or reads in flight: the engine must keep polling."""
        return bool(self._held or self._reads)

    # ---- the prefill side ---------------------------------------------------------------------------------------

    def _serve_metadata(self) -> ThreadingHTTPServer:
        payload = json.dumps({"engine_id": self.config.engine_id, "layout": asdict(self.layout),
                              "agent_metadata": base64.b64encode(self.agent.get_agent_metadata()).decode()}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                found = self.path == METADATA_PATH
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload) if found else 0))
                self.end_headers()
                if found:
                    self.wfile.write(payload)

            def log_message(self, *args):  # one GET per decode instance: not worth a log line
                pass

        address = (self.config.kv_ip, self.config.kv_port)
        try:
            server = ThreadingHTTPServer(address, Handler)
        except OSError as e:
            raise ValueError(f"the NIXL side channel cannot listen on {address[0]}:{address[1]} ({e}): set another "
                             "kv_ip or kv_port in --kv-transfer-config") from e
        threading.Thread(target=server.serve_forever, name="nixl-side-channel", daemon=True).start()
        return server

    def hold(self, request_id: str, block_ids: list[int], token_ids: list[int]) -> dict:
        """Keeps a finished prefill's blocks until a decode instance has read them (or the timeout); returns the
        kv_transfer_params that tell it how."""
        if block_ids:
            if request_id in self._held:  # an id used again before its blocks were read: the newer one wins
                self.block_manager.release_blocks(self._held.pop(request_id).block_ids)
            self.block_manager.hold_blocks(block_ids)
            self._held[request_id] = _Held(list(block_ids), time.monotonic() + self.config.abort_request_timeout)
        return remote_decode_params(self.config.engine_id, request_id, self.config.kv_ip, self.side_channel_port,
                                    block_ids, self.layout.block_size, token_ids, self.kv_precision)

    def _progress(self):
        while not self._closed.wait(PROGRESS_SECONDS):
            for messages in self.agent.get_new_notifs().values():
                for message in messages:
                    self._notifications.put(message)

    def _free_blocks_read(self):
        while not self._notifications.empty():
            held = self._held.pop(self._notifications.get().decode(), None)
            if held is not None:
                self.block_manager.release_blocks(held.block_ids)
        now = time.monotonic()
        while self._held:
            request_id, held = next(iter(self._held.items()))  # one timeout for all: oldest deadline first
            if held.deadline > now:
                break
            del self._held[request_id]
            self.block_manager.release_blocks(held.block_ids)
            self.expired_requests += 1
            logger.warning("request %s: no decode instance read its KV within %.0f s; its blocks are freed",
                           request_id, self.config.abort_request_timeout)

    # ---- the decode side ----------------------------------------------------------------------------------------

    def load(self, seq: Sequence, local_blocks: list[int], remote_blocks: list[int]):
        """Starts reading seq's prompt KV from the prefill instance into local_blocks (poll() says when it is done)."""
        self.block_manager.hold_blocks(local_blocks)  # a read may still write them after seq is aborted
        self._reads.append(_Read(seq.remote_prefill, seq, list(local_blocks), list(remote_blocks), time.monotonic()))

    def release(self, remote: RemotePrefill):
        """Tells the prefill instance its blocks are not needed (found in the local prefix cache, or aborted)."""
        if remote.block_ids:
            self._reads.append(_Read(remote, None, [], [], time.monotonic()))

    def fall_back(self, remote: RemotePrefill, request_id: str, reason: str, detail: str):
        """This request computes its prompt here: counted (by reason), logged (with the detail), and the prefill
        instance's blocks released."""
        self.fallbacks[reason] += 1
        logger.warning("request %s: computing the prompt here instead of reading its KV: %s", request_id, detail)
        self.release(remote)

    def abandon(self, seq: Sequence):
        """seq was aborted: its read (if any) finishes unobserved, else the prefill instance is told to free."""
        for read in self._reads:
            if read.seq is seq:
                read.seq = None
                return
        self.release(seq.remote_prefill)

    def poll(self) -> list[tuple[Sequence, bool]]:
        """Frees blocks decode instances have read or left too long; returns the sequences whose read ended, each
        with whether it succeeded (a failed one was logged and counted; its sequence computes its prompt itself)."""
        self._free_blocks_read()
        ended = []
        for read in list(self._reads):
            if read.outcome is None:
                read.outcome = self._advance(read)
                if read.outcome is None:
                    continue
                self._record(read)
                if read.seq is not None:
                    ended.append((read.seq, read.outcome is True))
                    read.seq = None
            if self._release_handle(read):
                self._reads.remove(read)
                self.block_manager.release_blocks(read.local_blocks)
        if self._retired:
            self._remove_retired_peers()
        return ended

    def idle(self):
        time.sleep(IDLE_POLL_SECONDS)

    def _advance(self, read: _Read) -> bool | str | None:
        try:
            if read.handle is None:
                return self._start(read)
            state = self.agent.check_xfer_state(read.handle)
        except Exception as e:  # NIXL raises on a peer that went away
            return f"{type(e).__name__}: {e}"
        if state == "DONE":
            return True
        if state == "ERR":
            return "the transfer failed"
        return self._timed_out(read)

    def _start(self, read: _Read) -> bool | str | None:
        peer = read.peer = read.peer or self._peer(read.remote)
        if peer.agent_name is None and peer.error is None and peer.metadata.done():
            self._handshake(peer)
        if peer.error is not None:
            return peer.error
        if peer.agent_name is None:
            return self._timed_out(read)
        notification = read.remote.request_id.encode()
        if not read.remote_blocks:
            self.agent.send_notif(peer.agent_name, notification)
            return True
        read.handle = self.agent.make_prepped_xfer(
            "READ", self._local_dlist, self.layout.indices(read.local_blocks), peer.dlist,
            peer.layout.indices(read.remote_blocks), notif_msg=notification)
        state = self.agent.transfer(read.handle)
        return True if state == "DONE" else "the transfer failed" if state == "ERR" else None

    def _timed_out(self, read: _Read) -> str | None:
        waited = time.monotonic() - read.started
        return f"no KV after {waited:.1f} s (load_timeout)" if waited > self.config.load_timeout else None

    def _record(self, read: _Read):
        if not read.remote_blocks:
            return
        if read.outcome is True:
            self.blocks_read += len(read.remote_blocks)
            self.read_seconds.observe(time.monotonic() - read.started)
            self.read_bytes.observe(len(read.remote_blocks) * self.layout.bytes_per_block)
            return
        self.failed_reads += 1
        if read.seq is not None:
            self.fallbacks["transfer_failed"] += 1
            logger.warning("request %s: reading its KV from %s:%d failed (%s); computing the prompt here",
                           read.seq.request_id, read.remote.host, read.remote.port, read.outcome)
        if read.peer is not None and self._peers.get(read.peer.engine_id) is read.peer:
            self._retire(read.peer)  # a later request handshakes again

    def _release_handle(self, read: _Read) -> bool:
        """False while NIXL may still write into the read's blocks (a timed-out transfer it could not abort)."""
        if read.handle is None:
            return True
        try:
            self.agent.release_xfer_handle(read.handle)
        except Exception as e:
            logger.error("a KV read's handle could not be released (%s); its blocks stay in use", e)
            return False
        read.handle = None
        return True

    # ---- prefill instances, as peers ----------------------------------------------------------------------------

    def _peer(self, remote: RemotePrefill) -> _Peer:
        peer = self._peers.get(remote.engine_id)
        if peer is None:
            metadata = self._handshakes.submit(fetch_metadata, remote.host, remote.port)
            peer = self._peers[remote.engine_id] = _Peer(remote.engine_id, f"{remote.host}:{remote.port}", metadata)
        return peer

    def _handshake(self, peer: _Peer):
        try:
            self._connect(peer)
        except Exception as e:
            peer.error = f"no handshake with the prefill instance at {peer.address}: {type(e).__name__}: {e}"
            self._retire(peer)

    def _connect(self, peer: _Peer):
        metadata = peer.metadata.result()
        if metadata["engine_id"] != peer.engine_id:
            raise ValueError(f"its side channel now belongs to engine {metadata['engine_id']}, not "
                             f"{peer.engine_id} (it restarted and its blocks are gone)")
        layout = KVLayout(**{**metadata["layout"], "planes": [tuple(p) for p in metadata["layout"]["planes"]]})
        problem = self.layout.mismatch(layout)
        if problem:
            raise ValueError(problem)
        peer.agent_name = self.agent.add_remote_agent(base64.b64decode(metadata["agent_metadata"]))
        peer.layout = layout
        peer.dlist = self.agent.prep_xfer_dlist(peer.agent_name, layout.descriptors(), layout.mem_type)

    def _retire(self, peer: _Peer):
        self._peers.pop(peer.engine_id, None)
        self._retired.append(peer)

    def _remove_retired_peers(self):
        in_use = {id(read.peer) for read in self._reads}
        for peer in [p for p in self._retired if id(p) not in in_use]:
            self._retired.remove(peer)
            try:
                if peer.dlist is not None:
                    self.agent.release_dlist_handle(peer.dlist)
                if peer.agent_name is not None:
                    self.agent.remove_remote_agent(peer.agent_name)
            except Exception as e:  # a peer that is gone may be gone from NIXL already
                logger.debug("removing prefill instance %s: %s", peer.engine_id, e)

    # ---- reporting, shutdown ------------------------------------------------------------------------------------

    def stats(self) -> dict:
        return {"held_requests": len(self._held), "reads_in_flight": sum(1 for r in self._reads if r.remote_blocks),
                "blocks_read": self.blocks_read, "failed_reads": self.failed_reads,
                "expired_requests": self.expired_requests, "fallbacks": dict(self.fallbacks),
                "read_seconds": self.read_seconds.snapshot(), "read_bytes": self.read_bytes.snapshot()}

    def close(self):
        self._closed.set()
        self._progress_thread.join()
        if self.side_channel is not None:
            self.side_channel.shutdown()
            self.side_channel.server_close()
        self._handshakes.shutdown(wait=False, cancel_futures=True)
        try:
            self.agent.release_dlist_handle(self._local_dlist)
            self.agent.deregister_memory(self._registered)
        except Exception as e:
            logger.debug("releasing NIXL resources: %s", e)


def fetch_metadata(host: str, port: int) -> dict:
    response = httpx.get(f"http://{host}:{port}{METADATA_PATH}", timeout=10)
    response.raise_for_status()
    return response.json()
