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
# One fused function serves every layer geometry of a model, each its own compiled variant: Gemma 4's norms alone
# take hidden rows, q/k heads of 256 and 512 and weight-free rows. Dynamo's recompile limit (default 8) was hit in
# the first forward of Gemma 4's 31B shape cut to 6 layers on an H100; vLLM raises the same limit.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


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
            # past the variants dynamo keeps, the eager function computes the same values, unfused
            if not warned:
                warned = True
                logger.warning("%s: torch.compile's variant limit reached; further shapes run unfused", fn.__name__)
            return fn(*args)

    return wrapper
