from __future__ import annotations

import math

import pytest
import torch

from mixquant.fidelity.metrics import first_divergence, kl_divergence, top1_agreement, wilson_interval


def test_kl_of_identical_distributions_is_zero():
    lp = torch.log_softmax(torch.randn(5, 11), -1)
    assert torch.equal(kl_divergence(lp, lp), torch.zeros(5, dtype=torch.float64))


def test_kl_by_hand():
    p, q = torch.tensor([[0.5, 0.25, 0.25]]), torch.tensor([[0.25, 0.5, 0.25]])
    expected = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    assert kl_divergence(p.log(), q.log()).item() == pytest.approx(expected)
    assert kl_divergence(torch.tensor([[1.0, 0.0]]).log(), torch.tensor([[0.5, 0.5]]).log()).item() == \
        pytest.approx(math.log(2))


def test_agreement_and_divergence():
    a = torch.log_softmax(torch.tensor([[3.0, 1.0], [0.0, 2.0]]), -1)
    b = torch.log_softmax(torch.tensor([[1.0, 3.0], [0.0, 2.5]]), -1)
    assert top1_agreement(a, a) == 1.0 and top1_agreement(a, b) == 0.5
    assert first_divergence([1, 2, 3], [1, 2, 3]) == 3
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


def test_wilson_interval():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
