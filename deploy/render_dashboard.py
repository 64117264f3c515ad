"""Draws the Grafana dashboard's panels from a Prometheus server's data into one PNG.

    python deploy/render_dashboard.py --prometheus http://127.0.0.1:9090 --model-name smollm2-135m-instruct \
        --minutes 30 --out deploy/dashboard.png

It runs each panel's PromQL (from deploy/grafana-dashboard.json, with the dashboard variables
filled in) through Prometheus's HTTP API and plots the answers with matplotlib, so a reader sees
what the panels show without a Grafana. Heatmap panels get per-bucket counts, as Grafana draws them.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import httpx

DASHBOARD = Path(__file__).resolve().parent / "grafana-dashboard.json"
UNITS = {"s": ("seconds", 1.0), "percentunit": ("%", 100.0), "short": ("", 1.0)}


def expand(expr: str, model_name: str, rate_interval: str) -> str:
    """A dashboard expression with Grafana's variables filled in, ready for Prometheus."""
    return expr.replace("$model_name", model_name).replace("$__rate_interval", rate_interval)


def panels(dashboard: dict) -> list[dict]:
    """The dashboard's panels that query data (rows left out), in layout order."""
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def expressions(dashboard: dict) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def legend(fmt: str, labels: dict) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or str(labels)


class Prometheus:
    """The two calls of Prometheus's HTTP API the picture needs."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=30)

    def _get(self, path: str, **params) -> list[dict]:
        body = self.http.get(path, params=params).json()
        if body.get("status") != "success":
            raise RuntimeError(f"{params.get('query')}: {body.get('error')}")
        return body["data"]["result"]

    def query(self, expr: str, at: float) -> list[dict]:
        return self._get("/api/v1/query", query=expr, time=at)

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)


def _values(series: dict) -> tuple[list[float], list[float]]:
    times = [float(t) for t, _ in series["values"]]
    return times, [float(v) for _, v in series["values"]]


def _draw_heatmap(ax, results: list[dict], start: float) -> None:
    """Cumulative `le` buckets -> counts per bucket over time, drawn as an image."""
    import numpy as np

    results = sorted(results, key=lambda r: float(r["metric"]["le"]))
    if not results:
        return
    times = _values(results[0])[0]
    grid = np.zeros((len(results), len(times)))
    for row, series in enumerate(results):
        index = {t: v for t, v in zip(*_values(series))}
        grid[row] = [index.get(t, 0.0) for t in times]
    grid = np.nan_to_num(np.diff(grid, axis=0, prepend=0.0)).clip(min=0)
    ax.imshow(grid, aspect="auto", origin="lower", cmap="Oranges",
              extent=(times[0] - start, times[-1] - start, 0, len(results)))
    labels = [r["metric"]["le"] for r in results]
    ticks = range(0, len(labels), max(1, len(labels) // 6))
    ax.set_yticks([i + 0.5 for i in ticks], [labels[i] for i in ticks], fontsize=7)
    ax.set_ylabel("bucket (le)", fontsize=8)


def render(prometheus_url: str, model_name: str, start: float, end: float, out: Path,
           rate_interval: str = "1m", dashboard_file: Path = DASHBOARD) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(dashboard_file.read_text())
    prom, shown = Prometheus(prometheus_url), panels(dashboard)
    step = max(1.0, (end - start) / 200)
    ncols = 3
    nrows = math.ceil(len(shown) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3.2 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, shown):
        ax.set_title(panel["title"], fontsize=10)
        ax.tick_params(labelsize=7)
        unit, scale = UNITS.get(panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short"), ("", 1.0))
        for target in panel["targets"]:
            expr = expand(target["expr"], model_name, rate_interval)
            if panel["type"] == "stat":
                text = "\n".join(legend(target["legendFormat"], r["metric"]) for r in prom.query(expr, end))
                ax.text(0.5, 0.5, text or "no data", ha="center", va="center", fontsize=12, wrap=True)
                ax.set_axis_off()
            elif panel["type"] == "heatmap":
                _draw_heatmap(ax, prom.query_range(expr, start, end, step), start)
                ax.set_xlabel("seconds", fontsize=8)
            else:
                for series in prom.query_range(expr, start, end, step):
                    times, values = _values(series)
                    ax.plot([t - start for t in times], [v * scale for v in values], linewidth=1,
                            label=legend(target["legendFormat"], series["metric"]))
                ax.set_ylabel(unit, fontsize=8)
                ax.set_xlabel("seconds", fontsize=8)
        if panel["type"] == "timeseries" and not any(any(map(math.isfinite, line.get_ydata()))
                                                     for line in ax.get_lines()):
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        elif panel["type"] == "timeseries":
            ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(shown):]:
        ax.set_axis_off()
    fig.suptitle(f"Trident dashboard: {model_name}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(end))}",
                 fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--model-name", required=True, help="the model_name label (the served model name)")
    parser.add_argument("--minutes", type=float, default=30, help="how far back from now")
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval stands for")
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    args = parser.parse_args()
    end = time.time()
    render(args.prometheus, args.model_name, end - 60 * args.minutes, end, args.out, args.rate_interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
