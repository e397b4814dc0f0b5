"""Markdown table and PNG plot of `lamina bench serve` results."""

from __future__ import annotations

from pathlib import Path

from app.bench.serve_stats import format_ms as ms
from app.bench.serve_stats import format_s


def write_table(runs, path: Path) -> None:
    lines = [
        "| server | concurrency | output tok/s | req/s | TTFT p50 / p99 (ms) "
        "| ITL p50 / p99 / max (ms) | E2E p50 / p99 (s) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        for lv in run.levels:
            lines.append(
                f"| {run.name} | {lv.concurrency} | {lv.output_tok_s:.1f} | "
                f"{lv.requests_per_s:.2f} | {ms(lv.ttft_p50_s)} / {ms(lv.ttft_p99_s)} | "
                f"{ms(lv.itl_p50_s)} / {ms(lv.itl_p99_s)} / {ms(lv.itl_max_s)} | "
                f"{format_s(lv.e2e_p50_s)} / {format_s(lv.e2e_p99_s)} | {lv.num_errors} |"
            )
    path.write_text("\n".join(lines) + "\n")


def write_plot(runs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tput, ax_lat) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        conc = [lv.concurrency for lv in run.levels]
        ax_tput.plot(conc, [lv.output_tok_s for lv in run.levels], marker="o", label=run.name)
        ax_lat.plot(
            conc,
            [_or_nan(lv.ttft_p50_s) for lv in run.levels],
            marker="o",
            label=f"{run.name} TTFT p50",
        )
        ax_lat.plot(
            conc,
            [_or_nan(lv.itl_p50_s) for lv in run.levels],
            marker="s",
            linestyle="--",
            label=f"{run.name} ITL p50",
        )
    ax_tput.set(xlabel="concurrent streams", ylabel="output tokens/s", title="Throughput")
    ax_lat.set(xlabel="concurrent streams", ylabel="seconds", title="Latency", yscale="log")
    for ax in (ax_tput, ax_lat):
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _or_nan(v: float | None) -> float:
    return float("nan") if v is None else v
