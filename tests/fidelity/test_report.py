"""What `mixquant fidelity` writes from a result: the figure and the table (no model needed)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from mixquant.fidelity.run import ALL, FidelityResult, Stats, cut_off_warnings, figure, markdown
from mixquant.tiny import tasks


def stats(accuracy: float | None) -> Stats:
    graded = {} if accuracy is None else dict(accuracy=accuracy, accuracy_n=40,
                                              accuracy_ci95=(max(0.0, accuracy - 0.1), min(1.0, accuracy + 0.05)))
    return Stats(n=40, kl_mean=0.01, kl_p99=0.1, top1_agreement=0.99, first_divergence_mean=50.0, **graded)


@pytest.mark.parametrize("accuracy", [1.0, None], ids=["accuracy", "agreement"])
def test_the_legend_covers_no_bar(accuracy):
    # bars that reach the top of both panels, as the bundled model's do: no free corner for a legend inside
    groups = [ALL, *tasks.TASKS]
    result = FidelityResult("mixquant-tiny", 200, {pair: {g: stats(accuracy) for g in groups}
                                                   for pair in ("bf16/bf16", "fp8/bf16", "nvfp4/nvfp4")})
    fig = figure(result)
    try:
        renderer = fig.canvas.get_renderer()
        fig.draw(renderer)
        legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
        bars = [patch.get_window_extent(renderer) for ax in fig.axes for patch in ax.patches]
        assert legends and len(bars) == 2 * 3 * len(tasks.TASKS)
        for legend in legends:
            box = legend.get_window_extent(renderer)
            assert not any(box.overlaps(bar) for bar in bars)
            assert [t.get_text() for t in legend.get_texts()] == list(tasks.TASKS)
    finally:
        plt.close(fig)


def test_accuracy_that_the_limit_cut_off_is_flagged():
    # 5 arithmetic answers all cut off before the boxed answer: 0.00 is the limit's, not the pair's
    cut = Stats(n=5, kl_mean=0.0, kl_p99=0.0, top1_agreement=1.0, first_divergence_mean=64.0, accuracy=0.0,
                accuracy_n=5, accuracy_ci95=(0.0, 0.43), accuracy_cut_off=5)
    fine = Stats(n=5, kl_mean=0.0, kl_p99=0.0, top1_agreement=1.0, first_divergence_mean=20.0, accuracy=1.0,
                 accuracy_n=5, accuracy_ci95=(0.57, 1.0), accuracy_cut_off=2)
    result = FidelityResult("mixquant-tiny", 64, {"bf16/bf16": {"arithmetic": cut, "tool_use": fine,
                                                                "arithmetic <512": cut}})
    assert cut_off_warnings(result) == ["bf16/bf16 arithmetic: 5 of 5 graded generations reached the 64-token "
                                        "limit before an answer; raise --max-tokens"]
    table = markdown(result)
    assert "| 0.00 (0.00-0.43, n=5) **5 cut off** |" in table and "| 1.00 (0.57-1.00, n=5) |" in table
    assert table.endswith("**Warning:** " + cut_off_warnings(result)[0])
