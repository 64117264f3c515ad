"""Quality-versus-speed sweep results: records, Pareto fronts, markdown table and plot."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trident.bench.report import save_figure


@dataclass
class SweepPoint:
    """Measurements of one pruning setting (an extra body on one server, or one server)."""

    label: str
    base_url: str
    extra_body: dict
    perplexity: float | None          # None when perplexity was skipped
    agreement: float | None           # mean prefix agreement with the reference; None when skipped
    exact_match: float | None
    output_throughput: float          # output tok/s under the sweep's fixed concurrency
    request_throughput: float
    tpot_median_ms: float
    ttft_median_ms: float
    failed: int                       # failed requests of the throughput run
    errors: dict[str, int]            # their error messages -> count


def pareto_front(points: list[tuple[float, float]], maximize: tuple[bool, bool]) -> list[bool]:
    """For each (a, b) point, whether no other point is at least as good in both and better in one.

    `maximize` says per coordinate whether larger is better.
    """
    signed = [tuple(v if up else -v for v, up in zip(p, maximize)) for p in points]

    def dominated(i: int) -> bool:
        return any(all(o >= s for o, s in zip(other, signed[i])) and other != signed[i]
                   for j, other in enumerate(signed) if j != i)

    return [not dominated(i) for i in range(len(points))]


def speed_ppl_front(points: list[SweepPoint]) -> list[bool]:
    """Pareto front of higher output tok/s and lower perplexity (points without perplexity: False)."""
    scored = [i for i, p in enumerate(points) if p.perplexity is not None]
    front = pareto_front([(points[i].output_throughput, points[i].perplexity) for i in scored], (True, False))
    flags = [False] * len(points)
    for i, on in zip(scored, front):
        flags[i] = on
    return flags


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(points: list[SweepPoint]) -> str:
    """One row per point; the Pareto column marks the speed/perplexity front."""
    front = speed_ppl_front(points)
    lines = ["| point | perplexity | agreement | exact match | output tok/s | TPOT p50 (ms) | TTFT p50 (ms) | failed | Pareto |",
             "|---|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for point, on_front in zip(points, front):
        lines.append(f"| {point.label} | {_fmt(point.perplexity, '.3f')} | {_fmt(point.agreement, '.3f')} | "
                     f"{_fmt(point.exact_match, '.2f')} | {point.output_throughput:.2f} | {point.tpot_median_ms:.1f} | "
                     f"{point.ttft_median_ms:.1f} | {point.failed} | {'*' if on_front else ''} |")
    return "\n".join(lines) + "\n"


def plot_sweep(points: list[SweepPoint], path: str | Path) -> None:
    """PNG: perplexity and agreement against output tok/s, Pareto fronts drawn as lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = [("perplexity", "perplexity (lower is better)", False), ("agreement", "greedy agreement (higher is better)", True)]
    for ax, (name, ylabel, up) in zip(axes, panels):
        shown = [p for p in points if getattr(p, name) is not None]
        if not shown:
            ax.set_axis_off()
            ax.set_title(f"{name}: not measured")
            continue
        xs, ys = [p.output_throughput for p in shown], [getattr(p, name) for p in shown]
        ax.scatter(xs, ys, color="tab:blue", zorder=2)
        for p, x, y in zip(shown, xs, ys):
            ax.annotate(p.label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = sorted((x, y) for (x, y), on in zip(zip(xs, ys), pareto_front(list(zip(xs, ys)), (True, up))) if on)
        ax.plot([x for x, _ in front], [y for _, y in front], color="tab:red", marker="*", markersize=12,
                label="Pareto front", zorder=3)
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    save_figure(fig, path)
