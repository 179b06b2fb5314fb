"""Benchmark output: a table for the terminal and a PNG of throughput per pair."""
from __future__ import annotations

from pathlib import Path


def print_table(rows, ceilings: dict):
    if ceilings:
        print(f"ceilings measured in this run: BF16 matmul {ceilings['bf16_matmul_tflops']:.0f} TFLOP/s, "
              f"copy {ceilings['copy_gbps']:.0f} GB/s")
    print(f"{'kind':8} {'engine':12} {'pair':21} {'context':>8} {'batch':>5} {'tok/s':>11} {'rate':>14} "
          f"{'vs bf16':>8}")
    for r in rows:
        rate = f"{r.tflops:.0f} TFLOP/s" if r.tflops is not None else f"{r.gbps:.0f} GB/s"
        ratio = f"{r.ratio_to_baseline:.2f}x" if r.ratio_to_baseline is not None else "-"
        print(f"{r.kind:8} {r.engine:12} {r.label:21} {r.context:8d} "
              f"{r.batch:5d} {r.tokens_per_s:11.1f} {rate:>14} {ratio:>8}")


def plot_rows(rows, kind: str, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_of = (lambda r: r.context) if kind == "prefill" else (lambda r: r.batch)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list] = {}
    for r in rows:
        series.setdefault(f"{r.engine} {r.label}", []).append(r)
    for label, rs in series.items():
        rs = sorted(rs, key=x_of)
        ax.plot([x_of(r) for r in rs], [r.tokens_per_s for r in rs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)" if kind == "prefill" else "batch (sequences)")
    ax.set_ylabel(f"{kind} tokens/s")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
