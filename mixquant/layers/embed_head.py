"""The embedding and the LM head, vocab-parallel under tensor parallelism (vLLM's VocabParallelEmbedding and
ParallelLMHead): each rank holds an equal slice of the vocabulary's rows, the last one padded with zero rows, so a
tied head shares the embedding's slice."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixquant.distributed.parallel_state import (
    get_tp_rank, get_tp_size, tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce)


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.tp_size = get_tp_size()
        rows = -(-vocab_size // self.tp_size)
        self.vocab_start = get_tp_rank() * rows
        self.vocab_end = min(self.vocab_start + rows, vocab_size)
        self.weight = nn.Parameter(torch.empty(rows, hidden_size), requires_grad=False)

    def load_weight(self, tensor: torch.Tensor):
        """This rank's rows of the checkpoint's [vocab, hidden] tensor (a torch tensor or a checkpoint slice)."""
        if tuple(tensor.shape) != (self.vocab_size, self.hidden_size):
            raise ValueError(f"checkpoint shape {tuple(tensor.shape)}, the model expects "
                             f"{(self.vocab_size, self.hidden_size)}")
        held = self.vocab_end - self.vocab_start
        self.weight.data[:held].copy_(tensor[self.vocab_start:self.vocab_end])
        self.weight.data[held:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        # tokens another rank holds look up a zero row here; the sum over ranks is each token's one real row
        local = input_ids - self.vocab_start
        elsewhere = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        rows = F.embedding(local.masked_fill(elsewhere, 0), self.weight).masked_fill(elsewhere[:, None], 0)
        return tensor_model_parallel_all_reduce(rows)


class LMHead(VocabEmbedding):
    """Stays unquantized in every phase; tied to the embedding when the config says so. Each rank computes the logits
    of its vocabulary slice; they are gathered on every rank, padding dropped."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight).float()
        if self.tp_size == 1:
            return logits
        return tensor_model_parallel_all_gather(logits)[:, :self.vocab_size]
