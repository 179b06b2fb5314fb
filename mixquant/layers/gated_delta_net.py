"""Gated DeltaNet (Qwen3.5's linear attention): projections by phase, a causal conv and the gated delta rule over a
per-sequence state.

`in_proj_qkvz` (the checkpoint's in_proj_qkv and in_proj_z, fused) and `out_proj` are Linear layers, so the loader
gives them per-phase methods like every other projection: a prompt's rows run in the prefill precision and write the
sequence's conv and recurrent state, which its decode rows then read, as the KV cache is written and read.
`in_proj_b` / `in_proj_a` (one column per value head), the conv, `A_log`, `dt_bias` and the norm stay in the model
dtype in every phase, and the recurrence runs in fp32, as in transformers and the published quantization recipes.

A sequence's state lives in a slot of the runner's state pool (engine/state_slots.py), bound here as `conv_state`
[rows, conv_dim, kernel] (the conv's last `kernel` inputs, model dtype) and `recurrent_state`
[rows, value_heads, key_head_dim, value_head_dim] (fp32). On CUDA with fla-core installed (`mixquant[gdn]`) the conv
and the recurrence run its Triton kernels: chunked varlen over multi-row segments, fused recurrent over single decode
rows. Elsewhere a PyTorch reference runs: transformers' torch path (chunked form for a segment of several rows, the
per-token form for one), segment by segment.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from mixquant.layers.layernorm import GatedRMSNorm
from mixquant.layers.linear import Linear
from mixquant.utils.context import StateSegments, get_context

CHUNK_SIZE = 64  # the chunked form's block of positions, as transformers and fla use


@functools.cache
def fla_installed() -> bool:
    return importlib.util.find_spec("fla") is not None


def uses_fla(x: torch.Tensor) -> bool:
    """fla-core's kernels for CUDA tensors where it is installed; the PyTorch reference for everything else."""
    return x.is_cuda and fla_installed()


class GatedDeltaNet(nn.Module):
    def __init__(self, config, prefix: str):
        super().__init__()
        hidden = config.hidden_size
        self.num_k_heads, self.num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        if self.num_v_heads % self.num_k_heads:
            raise ValueError(f"{prefix}: linear_num_value_heads ({self.num_v_heads}) must be a multiple of "
                             f"linear_num_key_heads ({self.num_k_heads})")
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel_size = config.linear_conv_kernel_dim
        self.in_proj_qkvz = Linear(hidden, [self.conv_dim, self.value_dim], False, f"{prefix}.in_proj_qkvz",
                                   shard_names=["in_proj_qkv", "in_proj_z"])
        self.in_proj_b = nn.Linear(hidden, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden, self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel_size, groups=self.conv_dim, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads), requires_grad=False)
        self.dt_bias = nn.Parameter(torch.empty(self.num_v_heads), requires_grad=False)
        self.norm = GatedRMSNorm(self.head_v_dim, config.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, [hidden], False, f"{prefix}.out_proj")
        for param in (*self.in_proj_b.parameters(), *self.in_proj_a.parameters(), *self.conv1d.parameters()):
            param.requires_grad_(False)
        self.conv_state = self.recurrent_state = torch.empty(0)  # bound by the runner (StatePool)

    @staticmethod
    def kernel_path(device: torch.device) -> str:
        """Which implementation these layers run on `device`, as said at start-up."""
        if device.type != "cuda":
            return f"Gated DeltaNet in the PyTorch reference ({device.type})"
        if fla_installed():
            return "Gated DeltaNet in fla-core's Triton kernels (chunked varlen prefill, fused recurrent decode)"
        return ("Gated DeltaNet in the PyTorch reference on CUDA, slow: pip install 'mixquant[gdn]' for fla-core's "
                "kernels")

    def state_shapes(self, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The per-sequence state, by the attribute the runner binds it to: (shape of one slot, dtype)."""
        return {"conv_state": ((self.conv_dim, self.kernel_size), dtype),
                "recurrent_state": ((self.num_v_heads, self.head_k_dim, self.head_v_dim), torch.float32)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segments = get_context().state
        qkv, z = self.in_proj_qkvz(x).split([self.conv_dim, self.value_dim], dim=-1)
        beta = self.in_proj_b(x).sigmoid()
        # the decay in fp32 (in 16 bits exp(A_log) may overflow), as transformers computes it
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)
        core = torch.empty(x.shape[0], self.num_v_heads, self.head_v_dim, dtype=x.dtype, device=x.device)
        split = segments.bounds[segments.num_prefill]
        # the prefill rows' segments first: a sequence whose last prompt token is a decode row of this step reads
        # the state its prompt rows have just written
        for rows, group in ((slice(0, split), segments.prefill()), (slice(split, x.shape[0]), segments.decode())):
            if group is not None:
                core[rows] = self._mix(qkv[rows], g[rows], beta[rows], group)
        out = self.norm(core, z.view(core.shape))
        return self.out_proj(out.flatten(1))

    def _mix(self, qkv: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, segments: StateSegments) -> torch.Tensor:
        """One group of segments (each sequence at most once): conv, then the delta rule, each slot's state updated."""
        mixed = self._conv(qkv, segments)
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(-1, self.num_k_heads, self.head_k_dim)
        k = k.reshape(-1, self.num_k_heads, self.head_k_dim)
        v = v.reshape(-1, self.num_v_heads, self.head_v_dim)
        return self._delta_rule(q, k, v, g, beta, segments)

    def _conv(self, x: torch.Tensor, segments: StateSegments) -> torch.Tensor:
        weight = self.conv1d.weight[:, 0]  # [conv_dim, kernel]
        state = initial_state(self.conv_state, segments)
        if uses_fla(x):
            from fla.modules.causal_conv1d import causal_conv1d, causal_conv1d_update

            if one_row_each(x, segments):
                out, state = causal_conv1d_update(x, state, weight=weight, activation="silu")
            else:
                out, state = causal_conv1d(x[None], weight=weight, initial_state=state, output_final_state=True,
                                           activation="silu", cu_seqlens=segments.cu_seqlens)
                out = out[0]
        else:
            out = causal_conv1d_reference(x, weight, state, segments)
        self.conv_state[segments.slots] = state
        return out

    def _delta_rule(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                    segments: StateSegments) -> torch.Tensor:
        state = initial_state(self.recurrent_state, segments)
        if uses_fla(q):
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

            if one_row_each(q, segments):  # a decode batch: one token per sequence, the batch axis is the sequence's
                out, state = fused_recurrent_gated_delta_rule(
                    q[:, None], k[:, None], v[:, None], g=g[:, None], beta=beta[:, None], initial_state=state,
                    output_final_state=True, use_qk_l2norm_in_kernel=True)
                out = out[:, 0]
            else:
                out, state = chunk_gated_delta_rule(
                    q[None], k[None], v[None], g=g[None], beta=beta[None], initial_state=state,
                    output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=segments.cu_seqlens)
                out = out[0]
        else:
            out = gated_delta_rule_reference(q, k, v, g, beta, state, segments)
        self.recurrent_state[segments.slots] = state
        return out


def initial_state(pool: torch.Tensor, segments: StateSegments) -> torch.Tensor:
    """Each segment's state before it, gathered from its slot: zeros for a segment that starts its sequence (a slot
    keeps whatever its last sequence left)."""
    state = pool[segments.slots]
    return torch.where(segments.resume.view(-1, *[1] * (state.dim() - 1)), state, 0)


def one_row_each(x: torch.Tensor, segments: StateSegments) -> bool:
    return len(segments.bounds) - 1 == x.shape[0]


# ---- PyTorch reference (CPU, and CUDA without fla-core) ------------------------------------------------------------

def causal_conv1d_reference(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor,
                            segments: StateSegments) -> torch.Tensor:
    """silu(depthwise causal conv) of x [rows, channels] with weight [channels, kernel], each segment continuing from
    its state [segments, channels, kernel] (its last `kernel` inputs), which is replaced by the segment's own."""
    kernel = weight.shape[1]
    if one_row_each(x, segments):
        window = torch.cat([state[:, :, 1:], x[:, :, None]], dim=-1)
        state.copy_(window)
        return F.silu((window * weight).sum(-1)).to(x.dtype)
    out = torch.empty_like(x)
    for i, (start, end) in enumerate(zip(segments.bounds, segments.bounds[1:])):
        window = torch.cat([state[i], x[start:end].t()], dim=-1)  # [channels, kernel + rows]
        state[i] = window[:, -kernel:]
        # output j reads window[j:j + kernel]; the first ends at the last input before the segment
        out[start:end] = F.conv1d(window[None], weight[:, None], groups=weight.shape[0])[0, :, 1:].t()
    return F.silu(out)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gated_delta_rule_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, state: torch.Tensor, segments: StateSegments) -> torch.Tensor:
    """q, k [rows, key_heads, dk], v [rows, value_heads, dv], g (log decay) and beta [rows, value_heads]; state
    [segments, value_heads, dk, dv] fp32 holds each segment's initial state and is replaced by its final one.
    Returns [rows, value_heads, dv] in v's dtype. q and k are L2-normalised, q scaled by dk^-0.5, and every key head
    serves value_heads / key_heads consecutive value heads, all in fp32."""
    dtype, repeat = v.dtype, v.shape[1] // k.shape[1]
    q = l2norm(q.float()).repeat_interleave(repeat, dim=1) * q.shape[-1] ** -0.5
    k = l2norm(k.float()).repeat_interleave(repeat, dim=1)
    v, g, beta = v.float(), g.float(), beta.float()
    if one_row_each(q, segments):
        out, final = recurrent_step(q, k, v, g, beta, state)
        state.copy_(final)
        return out.to(dtype)
    out = torch.empty_like(v)
    for i, (start, end) in enumerate(zip(segments.bounds, segments.bounds[1:])):
        rows = slice(start, end)
        out[rows], state[i] = chunked(q[rows], k[rows], v[rows], g[rows], beta[rows], state[i])
    return out.to(dtype)


def recurrent_step(q, k, v, g, beta, state) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row (the rows' sequences side by side): decay the state, write the delta, read it with q."""
    state = state * g.exp()[..., None, None]
    delta = (v - (state * k[..., None]).sum(-2)) * beta[..., None]
    state = state + k[..., None] * delta[..., None, :]
    return (state * q[..., None]).sum(-2), state


def chunked(q, k, v, g, beta, state) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's rows [T, heads, ...] by the chunked (WY) form: within a chunk of CHUNK_SIZE positions the
    delta-rule updates solve as one triangular system, and the state passes from chunk to chunk."""
    length = q.shape[0]
    pad = -length % CHUNK_SIZE

    def by_chunk(x: torch.Tensor) -> torch.Tensor:  # [T, heads, ...] -> [heads, chunks, CHUNK_SIZE, ...]
        x = F.pad(x, (0, 0) * (x.dim() - 1) + (0, pad)).transpose(0, 1)
        return x.reshape(x.shape[0], -1, CHUNK_SIZE, *x.shape[2:])

    q, k, v, g, beta = map(by_chunk, (q, k, v, g, beta))
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    decay = g.cumsum(-1)  # log of the decay from the chunk's start to each position
    future = torch.ones(CHUNK_SIZE, CHUNK_SIZE, dtype=torch.bool, device=q.device).triu(1)
    pair_decay = (decay[..., :, None] - decay[..., None, :]).masked_fill(future, float("-inf")).exp()
    system = (k_beta @ k.transpose(-1, -2)) * pair_decay
    within = (q @ k.transpose(-1, -2)) * pair_decay
    values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    k_decayed = torch.linalg.solve_triangular(system, k_beta * decay.exp()[..., None], upper=False,
                                              unitriangular=True)
    q = q * decay.exp()[..., None]
    k = k * (decay[..., -1:] - decay).exp()[..., None]
    chunk_decay = decay[..., -1].exp()[..., None, None]
    out = torch.empty_like(values)
    for i in range(values.shape[1]):
        new = values[:, i] - k_decayed[:, i] @ state
        out[:, i] = q[:, i] @ state + within[:, i] @ new
        state = state * chunk_decay[:, i] + k[:, i].transpose(-1, -2) @ new
    out = out.reshape(out.shape[0], -1, out.shape[-1])[:, :length].transpose(0, 1)
    return out, state
