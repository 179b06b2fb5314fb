"""Serving across processes: tensor parallelism (parallel_state.py: the process group and its collectives;
executor.py: the worker processes and how the driver runs a step on all of them), and KV cache transfer between a
prefill and a decode instance (kv_transfer.py, nixl_connector.py)."""
