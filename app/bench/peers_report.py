"""Medians, ratios, a markdown table and a PNG for `lamina bench peers`.

A sample is one (round, series, precision, streams) cell: its output tokens/s, its
latency summary and the load average before and after it. A series' figure for a
(precision, streams) pair is the median over rounds; the ratio is lamina's median over
llama.cpp's in the same precision.
"""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from app.bench.peers_build import NATIVE_FLAGS, cpu_flags
from app.bench.peers_servers import LAMINA, LLAMA_CPP


@dataclass
class Sample:
    round: int
    series: str  # lamina, llama.cpp, lamina-gguf, lamina-spec, ...
    precision: str
    streams: int
    output_tok_s: float
    num_errors: int
    num_short: int  # requests that returned fewer tokens than asked (ignore_eos broken)
    load_before: list[float]
    load_after: list[float]
    summary: dict = field(default_factory=dict)  # LevelSummary as a dict


Key = tuple[str, str, int]  # (series, precision, streams)


def medians(samples: list[Sample]) -> dict[Key, float]:
    """Median output tokens/s over rounds for every (series, precision, streams)."""
    groups: dict[Key, list[float]] = {}
    for s in samples:
        groups.setdefault((s.series, s.precision, s.streams), []).append(s.output_tok_s)
    return {key: statistics.median(values) for key, values in groups.items()}


def ranges(samples: list[Sample]) -> dict[Key, tuple[float, float]]:
    groups: dict[Key, list[float]] = {}
    for s in samples:
        groups.setdefault((s.series, s.precision, s.streams), []).append(s.output_tok_s)
    return {key: (min(values), max(values)) for key, values in groups.items()}


def ratios(
    med: dict[Key, float], numerator: str = LAMINA, denominator: str = LLAMA_CPP
) -> dict[tuple[str, int], float]:
    """(precision, streams) -> numerator's median / denominator's, where both exist."""
    out = {}
    for (series, precision, streams), value in med.items():
        base = med.get((denominator, precision, streams))
        if series == numerator and base:
            out[(precision, streams)] = value / base
    return out


def ratio_lines(lamina_over_llama: dict[tuple[str, int], float]) -> list[str]:
    """One line per (precision, streams) this run measured: lamina / llama.cpp."""
    return [
        f"{precision}, {streams} stream(s): lamina/llama.cpp {ratio:.2f}x"
        for (precision, streams), ratio in sorted(
            lamina_over_llama.items(), key=lambda item: _order(item[0])
        )
    ]


def speculation_lines(spec_over_plain: dict[tuple[str, int], float], identical) -> list[str]:
    """Speculation on over off, per (precision, streams), and whether outputs matched."""
    lines = []
    for (precision, streams), ratio in sorted(
        spec_over_plain.items(), key=lambda item: _order(item[0])
    ):
        lines.append(f"{precision}, {streams} stream(s): speculation on/off {ratio:.2f}x")
    if identical is not None:
        lines.append(
            f"outputs with speculation on = off: {identical['identical']} of "
            f"{identical['requests']} requests identical"
        )
    return lines


def _cell(rng: tuple[float, float] | None, med: float | None) -> str:
    if med is None or rng is None:
        return "-"
    low, high = rng
    return f"{med:.1f} ({low:.1f}-{high:.1f})" if high > low else f"{med:.1f}"


def markdown_table(samples: list[Sample], series: list[str]) -> str:
    """Median tokens/s (min-max over rounds) per series, and lamina / llama.cpp."""
    med, rng = medians(samples), ranges(samples)
    lamina_ratio = ratios(med)
    others = [s for s in series if s not in (LAMINA, LLAMA_CPP)]
    extra_ratios = {name: ratios(med, numerator=name) for name in others}
    header = ["precision", "streams", *series, "lamina / llama.cpp"]
    header += [f"{name} / llama.cpp" for name in others]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    cells = sorted({(p, n) for _, p, n in med}, key=_order)
    for precision, streams in cells:
        row = [precision, str(streams)]
        row += [
            _cell(rng.get((s, precision, streams)), med.get((s, precision, streams)))
            for s in series
        ]
        row.append(_ratio(lamina_ratio.get((precision, streams))))
        row += [_ratio(extra_ratios[name].get((precision, streams))) for name in others]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _order(cell: tuple[str, int]) -> tuple[int, int]:
    names = ["fp32", "fp16", "bf16", "int8", "int4"]
    precision, streams = cell
    return (names.index(precision) if precision in names else len(names), streams)


def machine() -> dict:
    """The CPU model, which native instruction sets it has, cores, memory."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory_gib = round(pages / 2**30, 1)
    except (ValueError, OSError):
        memory_gib = None
    return {
        "cpu": model,
        "flags": sorted(cpu_flags() & set(NATIVE_FLAGS)),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": memory_gib,
        "platform": platform.platform(),
    }


def write_png(samples: list[Sample], series: list[str], path: Path) -> None:
    """One panel per precision: median tokens/s per series, grouped by streams."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = medians(samples)
    precisions = sorted({p for _, p, _ in med}, key=lambda p: _order((p, 0)))
    streams = sorted({n for _, _, n in med})
    fig, axes = plt.subplots(
        1, len(precisions), figsize=(3.6 * len(precisions), 3.6), squeeze=False
    )
    width = 0.8 / max(len(series), 1)
    for ax, precision in zip(axes[0], precisions):
        for i, name in enumerate(series):
            values = [med.get((name, precision, n), 0.0) for n in streams]
            xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(streams))]
            ax.bar(xs, values, width, label=name)
        ax.set_xticks(list(range(len(streams))), [str(n) for n in streams])
        ax.set(title=precision, xlabel="streams", ylabel="output tokens/s")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("lamina bench peers: median output tokens/s over rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
