"""Builds Trident's Grafana dashboard with Grafana's own builders (grafana-foundation-sdk).

    python deploy/dashboard.py            # writes deploy/grafana-dashboard.json
    python deploy/dashboard.py --check    # exits 1 when the committed JSON is not what this builds

Every query selects `model_name="$model_name"` and runs on the `$datasource` Prometheus, both
dashboard variables. Quantiles come from the histograms' buckets, rates over `$__rate_interval`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common, dashboard, heatmap, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (BigValueGraphMode, BigValueTextMode, LegendDisplayMode, LegendPlacement,
                                                  TooltipDisplayMode)
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh, VariableSort
from grafana_foundation_sdk.models.heatmap import HeatmapColorMode
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUTPUT = Path(__file__).resolve().parent / "grafana-dashboard.json"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
M = '{model_name="$model_name"}'
RATE = "[$__rate_interval]"


def rate(series: str, by: str = "", selector: str = M) -> str:
    """sum [by (labels)] of the per-second rate of `series`."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping}(rate({series}{selector}{RATE}))"


def quantile(q: float, histogram: str) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket{M}{RATE})))"


def query(expr: str, legend: str, ref: str, fmt: PromQueryFormat | None = None, instant: bool = False):
    q = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref)
    if fmt is not None:
        q = q.format(fmt)
    return q.instant() if instant else q.range()


def lines(title: str, description: str, unit: str, targets: list[tuple[str, str]], width: int = 8,
          max_value: float | None = None):
    """A time-series panel of (expression, legend) pairs."""
    panel = (timeseries.Panel().title(title).description(description).datasource(DATASOURCE).unit(unit)
             .span(width).height(8).min(0).line_width(1).fill_opacity(10)
             .legend(common.VizLegendOptions().display_mode(LegendDisplayMode.LIST)
                     .placement(LegendPlacement.BOTTOM).show_legend(True))
             .tooltip(common.VizTooltipOptions().mode(TooltipDisplayMode.MULTI)))
    if max_value is not None:
        panel = panel.max(max_value)
    for i, (expr, legend) in enumerate(targets):
        panel = panel.with_target(query(expr, legend, chr(ord("A") + i)))
    return panel


def latency(title: str, histogram: str, description: str):
    return lines(title, description, "s", [(quantile(q, histogram), f"p{round(q * 100)}") for q in (0.5, 0.9, 0.99)])


def bucket_heatmap(title: str, description: str, histogram: str, unit: str):
    """Where a histogram's observations fell over time: per-bucket increases, one cell per bucket."""
    expr = f"sum by (le) (increase({histogram}_bucket{M}{RATE}))"
    return (heatmap.Panel().title(title).description(description).datasource(DATASOURCE).span(8).height(8)
            .calculate(False).y_axis(heatmap.YAxisConfig().unit(unit))
            .color(heatmap.HeatmapColorOptions().mode(HeatmapColorMode.SCHEME).scheme("Oranges").exponent(0.5).steps(64).fill("dark-orange"))
            .show_tooltip().show_y_histogram()
            .with_target(query(expr, "{{le}}", "A", PromQueryFormat.HEATMAP)))


def share_of(series: str, whole: str) -> str:
    """Per axis: the rate of `series` over the rate of `whole` (one series without an axis label)."""
    return f"{rate(series, 'axis')} / ignoring(axis) group_left() ({whole})"


def serving_row() -> list:
    return [
        latency("Time to first token", "trident:time_to_first_token_seconds",
                "HTTP arrival to the first generated token: queueing, tokenization and prefill."),
        latency("Inter-token latency", "trident:inter_token_latency_seconds",
                "Time between successive outputs of one request while it decodes."),
        latency("End-to-end request latency", "trident:e2e_request_latency_seconds",
                "HTTP arrival to the last token."),
        lines("Token throughput", "Prompt tokens admitted and tokens generated, per second.", "short",
              [(rate("trident:prompt_tokens_total"), "prompt"),
               (rate("trident:generation_tokens_total"), "generated")]),
        lines("Running and waiting requests", "Requests in the running batch and in the waiting queue; "
              "preemptions (recompute when the KV cache runs out) per second.", "short",
              [(f"sum(trident:num_requests_running{M})", "running"),
               (f"sum(trident:num_requests_waiting{M})", "waiting"),
               (rate("trident:num_preemptions_total"), "preemptions / s")]),
        lines("KV-cache usage", "Fraction of KV-cache blocks in use (the fullest worker).", "percentunit",
              [(f"max(trident:kv_cache_usage_perc{M})", "used")], max_value=1),
        lines("Finish reasons", "Finished completions per second: stop (EOS or stop string), "
              "length (max_tokens or context), abort (client left).", "short",
              [(rate("trident:request_success_total", "finished_reason"), "{{finished_reason}}")]),
        lines("Error rate", "Share of HTTP responses with a 4xx or 5xx status (all endpoints).", "percentunit",
              [(f'(sum(rate(trident_http_requests_total{{status=~"5.."}}{RATE})) or vector(0))'
                f" / sum(rate(trident_http_requests_total{RATE}))", "5xx"),
               (f'(sum(rate(trident_http_requests_total{{status=~"4.."}}{RATE})) or vector(0))'
                f" / sum(rate(trident_http_requests_total{RATE}))", "4xx")]),
        lines("Engine phases", "Median queue (waiting for a first step), prefill (first step to first "
              "token) and decode (first to last token) time per request.", "s",
              [(quantile(0.5, f"trident:request_{phase}_time_seconds"), phase)
               for phase in ("queue", "prefill", "decode")]),
    ]


def pruning_row() -> list:
    return [
        lines("FLOPs saved per axis", "FLOPs each pruning axis saved, as a share of what the dense model "
              "would have executed.", "percentunit",
              [(share_of("trident:flops_saved_total", rate("trident:flops_dense_total")), "{{axis}}")]),
        lines("Latency saved per axis", "Engine time each axis saved (measured step time attributed by FLOP "
              "share), as a share of the time the dense model would have taken.", "percentunit",
              [(share_of("trident:seconds_saved_total",
                         f"{rate('trident:engine_busy_seconds_total')} + {rate('trident:seconds_saved_total')}"),
                "{{axis}}")]),
        lines("Executed vs dense FLOP/s", "Matrix FLOPs per second the engine ran, and what the dense model "
              "would have run for the same tokens.", "short",
              [(rate("trident:flops_executed_total"), "executed"), (rate("trident:flops_dense_total"), "dense")]),
        bucket_heatmap("Early-exit layer", "Layer after which tokens left through an early exit (depth axis).",
                       "trident:exit_layer", "short"),
        lines("Draft acceptance", "Self-speculative decoding (depth axis): share of draft tokens the full "
              "model accepted.", "percentunit",
              [(f"{rate('trident:draft_tokens_accepted_total')} / {rate('trident:draft_tokens_proposed_total')}",
                "accepted")], max_value=1),
        lines("Tokens dropped and KV slots evicted", "Length axis, per second: prompt tokens dropped for "
              "deeper layers during prefill, KV-cache slots evicted by the decode budget.", "short",
              [(rate("trident:prompt_tokens_dropped_total"), "prompt tokens dropped"),
               (rate("trident:kv_slots_evicted_total"), "KV slots evicted")]),
        bucket_heatmap("Speedup over dense per request", "Distribution of finished requests' dense-equivalent "
                       "FLOPs over executed FLOPs.", "trident:request_speedup_over_dense", "short"),
        (stat.Panel().title("Active pruning plan").description("Plan name, the profile it came from, and the "
                                                               "digest of the checkpoint it was calibrated on.")
         .datasource(DATASOURCE).span(8).height(8).text_mode(BigValueTextMode.NAME)
         .graph_mode(BigValueGraphMode.NONE)
         .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
         .with_target(query(f"max by (name, profile, checkpoint_digest) (trident:pruning_plan_info{M})",
                            "{{name}} ({{profile}}, checkpoint {{checkpoint_digest}})", "A", instant=True))),
    ]


def build() -> dict:
    """The dashboard's JSON model."""
    model_name = (dashboard.QueryVariable("model_name").label("model")
                  .datasource(DATASOURCE).query("label_values(trident:num_requests_running, model_name)")
                  .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC))
    board = (dashboard.Dashboard("Trident").uid("trident").tags(["trident", "llm"]).refresh("10s")
             .time("now-30m", "now").timezone("browser")
             .with_variable(dashboard.DatasourceVariable("datasource").label("data source").type("prometheus"))
             .with_variable(model_name))
    panel_id = 1
    for title, panels in (("Serving", serving_row()), ("Pruning", pruning_row())):
        board = board.with_row(dashboard.Row(title).id(panel_id))
        for panel in panels:
            panel_id += 1
            board = board.with_panel(panel.id(panel_id))
        panel_id += 1
    return json.loads(JSONEncoder(sort_keys=True).encode(board.build()))


def render() -> str:
    return json.dumps(build(), indent=1, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed JSON instead of writing")
    args = parser.parse_args()
    if args.check:
        if OUTPUT.read_text() != render():
            print(f"{OUTPUT.name} is stale: run python deploy/dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
