"""Side by side: the accuracy of several result directories (one per precision pair), with the delta to the first."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixquant.eval.metrics import format_value, markdown_table, mean_over_seeds


@dataclass
class ResultDir:
    label: str
    accuracy: dict[str, float | None]  # benchmark -> accuracy, the mean over its seeds


def precision_label(directory: Path) -> str:
    """`<dir> (prefill/decode)` when the runs were against a mixquant server that reported its precisions."""
    for config_file in sorted(directory.glob("*_config.json")):
        precisions = (json.loads(config_file.read_text()).get("server") or {}).get("mixquant")
        if precisions:
            return f"{directory.name} ({precisions.get('prefill_precision')}/{precisions.get('decode_precision')})"
    return directory.name


def load_result_dir(directory: Path) -> ResultDir:
    per_seed: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for metrics_file in sorted(directory.glob("*_seed*_metrics.json")):
        metrics = json.loads(metrics_file.read_text())
        per_seed[metrics["benchmark"]].append(metrics)
    if not per_seed:
        raise FileNotFoundError(f"{directory} holds no *_seed*_metrics.json: is it a `mixquant eval` output directory?")
    accuracy = {benchmark: mean_over_seeds(runs)["acc"] for benchmark, runs in per_seed.items()}
    return ResultDir(precision_label(directory), accuracy)


def comparison_table(results: list[ResultDir]) -> str:
    """Benchmarks as rows, one column per directory; every column after the first shows its delta to the first."""
    benchmarks = sorted({benchmark for result in results for benchmark in result.accuracy})
    rows = []
    for benchmark in benchmarks:
        reference = results[0].accuracy.get(benchmark)
        row = [benchmark, format_value(reference, percent=True)]
        for result in results[1:]:
            value = result.accuracy.get(benchmark)
            cell = format_value(value, percent=True)
            if value is not None and reference is not None:
                cell += f" ({100 * (value - reference):+.1f})"
            row.append(cell)
        rows.append(row)
    return markdown_table(["benchmark (acc %)"] + [result.label for result in results], rows)


def plot_comparison(results: list[ResultDir], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    benchmarks = sorted({benchmark for result in results for benchmark in result.accuracy})
    width = 0.8 / len(results)
    figure, axes = plt.subplots(figsize=(max(6.0, len(benchmarks) * (1.0 + 0.4 * len(results))), 4.0))
    for index, result in enumerate(results):
        positions = [b + (index - (len(results) - 1) / 2) * width for b in range(len(benchmarks))]
        values = [100 * (result.accuracy.get(benchmark) or 0.0) for benchmark in benchmarks]
        bars = axes.bar(positions, values, width, label=result.label)
        axes.bar_label(bars, fmt="%.1f", fontsize=7)
    axes.set_xticks(range(len(benchmarks)), benchmarks)
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 105)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)


def compare(directories: list[Path], output_prefix: Path) -> str:
    """Write `<prefix>.md` and `<prefix>.png`; returns the markdown table."""
    results = [load_result_dir(directory) for directory in directories]
    table = comparison_table(results)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    output_prefix.with_suffix(".md").write_text(table + "\n")
    plot_comparison(results, output_prefix.with_suffix(".png"))
    return table
