"""Disaggregated prefill and decode: vLLM's `--kv-transfer-config` and the `kv_transfer_params` of its proxy protocol.

A prefill instance gets a request with `kv_transfer_params: {"do_remote_decode": true}`, computes every prompt token
but the last in its prefill precision, holds those KV blocks and answers with the `kv_transfer_params` a decode
instance needs to pull them (`do_remote_prefill: true`, the block ids, where to reach it). The decode instance reads
the blocks into its own paged cache, recomputes the last prompt token in its decode precision and generates.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

KV_ROLES = ("kv_both", "kv_producer", "kv_consumer")
EXTRA_CONFIG_DEFAULTS = {
    "backends": ["UCX"],
    # seconds a prefill instance holds blocks no decode instance has read (vLLM: VLLM_NIXL_ABORT_REQUEST_TIMEOUT)
    "abort_request_timeout": 480.0,
    # seconds a decode instance waits for a prefill instance's blocks (handshake and read) before computing the
    # prompt itself
    "load_timeout": 60.0,
}


@dataclass
class KVTransferConfig:
    """vLLM's --kv-transfer-config JSON, the fields this engine reads.

    kv_role: kv_producer only prefills (and may load only a pre-quantized prefill checkpoint), kv_consumer only
    decodes, kv_both does either as requests ask. kv_ip and kv_port: the side channel where decode instances fetch
    this instance's NIXL metadata; kv_ip is also the address they are told to reach (port 0: any free port).
    """
    kv_connector: str
    kv_role: str = "kv_both"
    kv_ip: str = "127.0.0.1"
    kv_port: int = 5600  # vLLM's VLLM_NIXL_SIDE_CHANNEL_PORT default
    engine_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    kv_load_failure_policy: str = "recompute"
    kv_connector_extra_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kv_connector != "NixlConnector":
            raise ValueError(f"kv_connector {self.kv_connector!r} is not supported; use NixlConnector")
        if self.kv_role not in KV_ROLES:
            raise ValueError(f"kv_role {self.kv_role!r} is not one of {', '.join(KV_ROLES)}")
        if self.kv_load_failure_policy != "recompute":
            raise ValueError(f"kv_load_failure_policy {self.kv_load_failure_policy!r} is not supported: a decode "
                             "instance whose KV cannot be read computes the prompt itself ('recompute')")
        if not isinstance(self.kv_port, int) or not 0 <= self.kv_port < 65536:
            raise ValueError(f"kv_port must be a port number (0: any free one), got {self.kv_port!r}")
        unknown = set(self.kv_connector_extra_config) - set(EXTRA_CONFIG_DEFAULTS)
        if unknown:
            raise ValueError(f"kv_connector_extra_config: unknown keys {', '.join(sorted(unknown))}; known: "
                             f"{', '.join(EXTRA_CONFIG_DEFAULTS)}")
        self.kv_connector_extra_config = {**EXTRA_CONFIG_DEFAULTS, **self.kv_connector_extra_config}
        for key in ("abort_request_timeout", "load_timeout"):
            if not self.kv_connector_extra_config[key] > 0:
                raise ValueError(f"kv_connector_extra_config.{key} must be > 0 seconds, "
                                 f"got {self.kv_connector_extra_config[key]!r}")

    @classmethod
    def from_dict(cls, values: dict) -> KVTransferConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"--kv-transfer-config: unknown keys {', '.join(sorted(unknown))}; known: "
                             f"{', '.join(sorted(known))}")
        if "kv_connector" not in values:
            raise ValueError('--kv-transfer-config needs "kv_connector": "NixlConnector"')
        return cls(**values)

    @property
    def prefills_for_others(self) -> bool:
        return self.kv_role in ("kv_both", "kv_producer")

    @property
    def decodes_for_others(self) -> bool:
        return self.kv_role in ("kv_both", "kv_consumer")

    @property
    def abort_request_timeout(self) -> float:
        return float(self.kv_connector_extra_config["abort_request_timeout"])

    @property
    def load_timeout(self) -> float:
        return float(self.kv_connector_extra_config["load_timeout"])

    @property
    def backends(self) -> list[str]:
        return list(self.kv_connector_extra_config["backends"])


def prompt_digest(token_ids: list[int]) -> str:
    """Names the tokens a prefill instance computed, so a decode instance reads KV only for the prompt it has."""
    return xxhash.xxh64(np.asarray(token_ids, dtype=np.int64).tobytes()).hexdigest()


@dataclass
class RemotePrefill:
    """A decode instance's view of a prefill instance's answer: which of its blocks hold this prompt's KV."""
    engine_id: str
    request_id: str
    host: str
    port: int
    block_ids: list[int]
    block_size: int
    num_tokens: int  # leading prompt positions the blocks hold KV of (every prompt token but the last)
    kv_precision: str  # the prefill instance's precision, under which the blocks enter the prefix cache
    prompt_digest: str

    @classmethod
    def from_params(cls, params: dict) -> RemotePrefill:
        """Checks the `kv_transfer_params` of a request that carries `do_remote_prefill: true`."""
        required = {"remote_engine_id": str, "remote_request_id": str, "remote_host": str, "remote_port": int,
                    "remote_block_ids": list, "remote_block_size": int, "remote_num_tokens": int,
                    "remote_kv_precision": str, "remote_prompt_digest": str}
        for key, kind in required.items():
            if not isinstance(params.get(key), kind) or isinstance(params.get(key), bool):
                raise ValueError(f"kv_transfer_params.{key}: expected {kind.__name__}, got {params.get(key)!r}")
        if params.get("tp_size", 1) != 1:
            raise ValueError(f"kv_transfer_params.tp_size {params['tp_size']!r}: only tp_size 1 is supported")
        blocks = params["remote_block_ids"]
        if any(not isinstance(b, int) or isinstance(b, bool) or b < 0 for b in blocks):
            raise ValueError("kv_transfer_params.remote_block_ids must be non-negative integers")
        block_size, num_tokens = params["remote_block_size"], params["remote_num_tokens"]
        if block_size < 1 or num_tokens < 0 or len(blocks) != -(-num_tokens // block_size):
            raise ValueError(f"kv_transfer_params: {len(blocks)} remote_block_ids of remote_block_size {block_size} "
                             f"cannot hold remote_num_tokens={num_tokens}")
        return cls(params["remote_engine_id"], params["remote_request_id"], params["remote_host"],
                   params["remote_port"], list(blocks), block_size, num_tokens, params["remote_kv_precision"],
                   params["remote_prompt_digest"])


def remote_decode_params(engine_id: str, request_id: str, host: str, port: int, block_ids: list[int],
                         block_size: int, token_ids: list[int], kv_precision: str) -> dict:
    """What a prefill instance answers (vLLM's fields, then what this engine's decode side checks)."""
    return {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": list(block_ids),
            "remote_engine_id": engine_id, "remote_request_id": request_id, "remote_host": host,
            "remote_port": port, "tp_size": 1, "remote_block_size": block_size, "remote_num_tokens": len(token_ids),
            "remote_kv_precision": kv_precision, "remote_prompt_digest": prompt_digest(token_ids)}
