"""What `mixquant fidelity` writes from a result: the figure (no model needed)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from mixquant.fidelity.run import ALL, FidelityResult, Stats, figure
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
