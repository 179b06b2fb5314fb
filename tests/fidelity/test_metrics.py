"""Fidelity metrics on cases computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from mixquant.fidelity.metrics import (
    first_divergence,
    kl_divergence,
    percentile,
    top1_agreement,
    wilson_interval,
)


def test_kl_of_identical_distributions_is_exactly_zero():
    lp = torch.log_softmax(torch.randn(5, 11), -1)
    assert torch.equal(kl_divergence(lp, lp), torch.zeros(5, dtype=torch.float64))


def test_kl_by_hand():
    # p = (1/2, 1/4, 1/4), q = (1/4, 1/2, 1/4): 1/2 log 2 + 1/4 log 1/2 + 0 = 1/4 log 2
    p, q = torch.tensor([[0.5, 0.25, 0.25]]), torch.tensor([[0.25, 0.5, 0.25]])
    assert kl_divergence(p.log(), q.log()).item() == pytest.approx(0.25 * math.log(2))
    # KL is not symmetric: KL(q || p) = 1/4 log 1/2 + 1/2 log 2 = 1/4 log 2 here too, but not for these:
    p, q = torch.tensor([[0.8, 0.1, 0.1]]), torch.tensor([[0.5, 0.25, 0.25]])
    by_hand = 0.8 * math.log(0.8 / 0.5) + 2 * 0.1 * math.log(0.1 / 0.25)
    assert kl_divergence(p.log(), q.log()).item() == pytest.approx(by_hand)
    assert kl_divergence(q.log(), p.log()).item() != pytest.approx(by_hand)


def test_kl_zero_probabilities():
    # tokens the reference gives probability 0 contribute nothing; 0 * log 0 must not turn into nan
    assert kl_divergence(torch.tensor([[1.0, 0.0]]).log(), torch.tensor([[0.5, 0.5]]).log()).item() == \
        pytest.approx(math.log(2))
    assert kl_divergence(torch.tensor([[1.0, 0.0]]).log(), torch.tensor([[1.0, 0.0]]).log()).item() == 0.0
    # the other run gives 0 to a token the reference can emit: infinitely surprised
    assert kl_divergence(torch.tensor([[0.5, 0.5]]).log(), torch.tensor([[1.0, 0.0]]).log()).item() == math.inf


def test_kl_per_position_and_shape_check():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]).log()
    q = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]]).log()
    assert kl_divergence(p, q).tolist() == pytest.approx([0.0, 0.25 * math.log(2)])
    with pytest.raises(ValueError, match="shapes differ"):
        kl_divergence(p, q[:1])


def test_top1_agreement():
    a = torch.log_softmax(torch.tensor([[3.0, 1.0], [0.0, 2.0]]), -1)
    b = torch.log_softmax(torch.tensor([[1.0, 3.0], [0.0, 2.5]]), -1)  # first argmax differs, second agrees
    disjoint = torch.log_softmax(torch.tensor([[1.0, 3.0], [2.0, 0.0]]), -1)
    assert top1_agreement(a, a) == 1.0
    assert top1_agreement(a, b) == 0.5
    assert top1_agreement(a, disjoint) == 0.0


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) == 3
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [9, 2, 3]) == 0
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # one stopped early (EOS) where the other went on
    assert first_divergence([], []) == 0


def test_percentile():
    values = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0 and percentile(values, 50) == 3.0
    assert percentile(values, 99) == pytest.approx(4.96)  # rank 0.99 * 4 = 3.96: 4 + 0.96 * (5 - 4)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_wilson_interval():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
