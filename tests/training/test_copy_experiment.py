"""The copy experiment's metric and batches (the experiment itself runs for half an hour on 2 cores)."""
import argparse
import random
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from mixquant.tiny import tasks
from training import copy_experiment
from training.train import document_mask, encode, stages


class Oracle(torch.nn.Module):
    """Logits that put all mass on the next token (shift=1) or on the current one (shift=0)."""

    def __init__(self, shift: int):
        super().__init__()
        self.shift = shift

    def forward(self, input_ids):
        ids = input_ids[0]
        chosen = torch.cat([ids[1:], ids[-1:]]) if self.shift else ids
        return SimpleNamespace(logits=torch.nn.functional.one_hot(chosen, 1408).float()[None])


def test_name_accuracy_scores_the_two_name_tokens():
    tok = copy_experiment.tokenizer()
    heldout = [encode(tok, e, False) for e in tasks.heldout("retrieval", 5, max_records=2, kinds=("name_by_id",))]
    assert copy_experiment.name_accuracy(Oracle(1), tok, heldout) == {"first": 1, "last": 1, "both": 1,
                                                                     "last|first": 1}
    assert copy_experiment.name_accuracy(Oracle(0), tok, heldout)["both"] == 0


def test_packed_batches_score_answers_of_both_kinds():
    tok = copy_experiment.tokenizer()
    pools = {kind: copy_experiment.encode_chunk((0, 8, kind, 2)) for kind in copy_experiment.QUESTIONS["copy"]}
    batch = copy_experiment.packed_batch(random.Random(0), pools, tok.pad_token_id)
    ids, targets, positions = batch["input_ids"], batch["targets"], batch["positions"]
    mask = document_mask(batch["documents"], dense=True)
    scored = targets != -100
    assert torch.equal(ids[:, 1:][scored[:, :-1]], targets[:, :-1][scored[:, :-1]])  # next-token targets
    text = tok.decode(ids[0])
    assert "Repeat the records as listed." in text and "What is the name on record" in text
    # each example attends causally within itself only (a new example starts where positions restart)
    used = int(scored[0].nonzero().max()) + 2
    documents = (positions[0, :used] == 0).cumsum(0)
    expected = (documents[:, None] == documents[None, :]) & torch.ones(used, used, dtype=torch.bool).tril()
    assert documents.max() > 1 and torch.equal(mask[0, 0, :used, :used], expected)


def test_curriculum_stages_and_their_errors():
    curriculum = partial(stages, share=int)
    assert curriculum("2") == [(2, None)]
    assert curriculum("2:1250,4:1000,8:1250") == [(2, 1250), (4, 1000), (8, 1250)]
    for text, problem in (("2:1250,8", "its share"), ("0", "positive"), ("2:0", "positive"), ("2:x", "N:INT")):
        with pytest.raises(argparse.ArgumentTypeError, match=problem):
            curriculum(text)
