"""Metrics over per-sample records, and the markdown tables that show them."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from statistics import fmean, pstdev
from typing import Any

# The headline numbers every benchmark reports, per seed and as the mean over seeds.
HEADLINE_METRICS = ("acc", "extracted_rate", "avg_length")


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return fmean(values) if values else None


def accuracy(records: list[dict[str, Any]]) -> float | None:
    """Share of correct answers among the scored records (a LongMemEval answer without a judge is not scored)."""
    return _mean(float(record["correct"]) for record in records if record.get("correct") is not None)


def summarize(records: list[dict[str, Any]], group_keys: Iterable[str] = ()) -> dict[str, Any]:
    """acc, extracted_rate (an answer could be found), avg_length (completion tokens) and n, with breakdowns."""
    metrics: dict[str, Any] = {
        "acc": accuracy(records),
        "extracted_rate": _mean(float(record.get("extracted") is not None) for record in records),
        "avg_length": _mean(record["tokens"] for record in records if record.get("tokens") is not None),
        "n": len(records),
        "n_scored": sum(record.get("correct") is not None for record in records),
        "n_errors": sum("error" in record for record in records),
    }
    for key in group_keys:
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record in records:
            groups[str(record.get(key))].append(record)
        metrics[f"by_{key}"] = {
            group: {"acc": accuracy(members), "n": len(members)} for group, members in sorted(groups.items())
        }
    return metrics


def mean_over_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline metrics averaged over seeds, with the spread of the accuracy."""
    mean: dict[str, Any] = {"seeds": [metrics["seed"] for metrics in per_seed]}
    for name in HEADLINE_METRICS:
        values = [metrics[name] for metrics in per_seed if metrics.get(name) is not None]
        mean[name] = _mean(values)
        if name == "acc":
            mean["acc_std"] = pstdev(values) if len(values) > 1 else None
    mean["n"] = min(metrics["n"] for metrics in per_seed)  # per seed; they differ only when a seed had failures
    return mean


def format_value(value: Any, percent: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{100 * value:.1f}" if percent else f"{value:.1f}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(results: list[tuple[str, str, dict[str, Any]]]) -> str:
    """One row per (benchmark, seed or "mean") with the headline metrics; accuracies in percent."""
    rows = [
        [
            benchmark,
            seed,
            format_value(metrics.get("acc"), percent=True),
            format_value(metrics.get("extracted_rate"), percent=True),
            format_value(metrics.get("avg_length")),
            format_value(metrics.get("n")),
        ]
        for benchmark, seed, metrics in results
    ]
    return markdown_table(["benchmark", "seed", "acc %", "extracted %", "avg tokens", "n"], rows)
