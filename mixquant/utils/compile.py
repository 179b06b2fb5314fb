"""Elementwise chains (norms, RoPE, gating) fused into single kernels by torch.compile, on GPUs only.

On a GPU each unfused chain costs several passes over the activations; on the CPU (tests, CI) the plain eager
function runs, so no compiler is needed there and results stay bit-comparable with transformers.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch._dynamo

logger = logging.getLogger(__name__)

FUSED_DEVICE_TYPES = ("cuda",)


def fused_on_gpu(fn):
    compiled = None
    warned = False

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled, warned
        if args[0].device.type not in FUSED_DEVICE_TYPES:
            return fn(*args)
        if compiled is None:
            # round every intermediate to its dtype as eager does, so the fused kernel keeps transformers' numerics
            compiled = torch.compile(fn, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True})
        try:
            return compiled(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            # One function serves every layer geometry of a model, each shape its own compiled variant: Gemma 4's
            # norm (hidden rows, q/k heads of 256 and 512, weight-free rows) hit dynamo's recompile limit in its
            # first forward on an H100. Past the limit the eager function computes the same values, unfused.
            if not warned:
                warned = True
                logger.warning("%s: torch.compile's variant limit reached; further shapes run unfused", fn.__name__)
            return fn(*args)

    return wrapper
