"""Elementwise chains (norms, RoPE, gating) fused into single kernels by torch.compile, on GPUs only.

On a GPU each unfused chain costs several passes over the activations; on the CPU (tests, CI) the plain eager
function runs, so no compiler is needed there and results stay bit-comparable with transformers.
"""
from __future__ import annotations

import functools

import torch


def fused_on_gpu(fn):
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled
        if not args[0].is_cuda:
            return fn(*args)
        if compiled is None:
            # round every intermediate to its dtype as eager does, so the fused kernel keeps transformers' numerics
            compiled = torch.compile(fn, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True})
        return compiled(*args)

    return wrapper
