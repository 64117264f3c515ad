"""`trident plan`: from a quality, speed or FLOP target to one plan across depth, width and length.

1. Statistics of the dense model on the start of the text, as `trident calibrate` collects them
   (width moments, Block Influence, the moments of every run of dropped layers the search can
   reach, exit probes calibrated for each agreement on the exit ladder).
2. A cost model fitted to steps timed on this device (engine.calibration.cost_model): about ten
   probe plans, side by side with dense, decode `batch` sequences at `context` tokens in lockstep
   and prefill one `context`-token prompt each in turn.
3. The joint search (engine.calibration.search): every point is a real combined plan
   (engine.calibration.compose) measured on held-out passages from the end of the text: the
   perplexity of a teacher-forced continuation after a `context`-token prompt, run through the
   engine with every axis on (prefill dropping on the prompt, the KV budget and exits on each
   decode step), and token agreement with dense given the same prefix. Speed is the cost model's.
4. The Pareto set, the plan that meets the target, and the profiles: `lossless` (no lossy
   pruning: dense weights; served with speculative decoding it stays greedy-identical),
   `balanced` and `aggressive` (fastest within PROFILE_LIMITS and predicted at least
   MIN_PROFILE_GAIN faster than dense, else dense), `long-context` (the smallest KV
   memory per sequence at LONG_CONTEXT tokens within its limit). The chosen plans are then timed
   against dense, next to the cost model's prediction.

Workloads: "decode" maximizes batch decode speed, "prefill" time to first token, "long-context"
decode speed with a KV budget ladder (and the same quality measure at the planning context).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from trident.engine.calibration.candidates import Planner, Settings
from trident.engine.calibration.compose import AXES, Point
from trident.engine.calibration.search import (Lattice, Measured, SearchResult, best_within, cheapest_reaching,
                                               greedy_path, pareto)

WORKLOADS = {"decode": "decode", "prefill": "prefill", "long-context": "decode"}   # workload -> timed phase
WORKLOAD_CONTEXT = {"decode": 1024, "prefill": 1024, "long-context": 4096}          # default prompt tokens
PROFILE_LIMITS = {"balanced": 1.05, "aggressive": 1.15, "long-context": 1.10}       # perplexity ratio to dense
MIN_PROFILE_GAIN = 1.03        # a profile must be predicted at least this much faster than dense, else
#                                it is dense: the cost model leaves out small costs (an exit's probe)
KV_BUDGET_FRACTIONS = (0.75, 0.5, 0.375, 0.25)


@dataclass
class Target:
    """What the chosen plan must meet: exactly one of the three."""

    max_perplexity_increase: float | None = None    # e.g. 0.05: the fastest plan within +5%
    target_speedup: float | None = None             # e.g. 1.5: the best-quality plan at least this fast
    flops_budget: float | None = None               # e.g. 0.6: the best-quality plan within 60% of dense FLOPs

    def check(self) -> None:
        given = [v for v in (self.max_perplexity_increase, self.target_speedup, self.flops_budget) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one target: --max-perplexity-increase, --target-speedup or --flops-budget")
        if self.max_perplexity_increase is not None and not self.max_perplexity_increase >= 0:
            raise ValueError(f"--max-perplexity-increase must be >= 0, got {self.max_perplexity_increase}")
        if self.target_speedup is not None and not self.target_speedup > 0:
            raise ValueError(f"--target-speedup must be > 0, got {self.target_speedup}")
        if self.flops_budget is not None and not 0 < self.flops_budget <= 1:
            raise ValueError(f"--flops-budget must be in (0, 1], got {self.flops_budget}")


def lattice_for(workload: str, context: int, base: Lattice | None = None) -> Lattice:
    """The ladders a workload searches: KV budgets only where decode is timed."""
    base = base or Lattice()
    budgets = (0,) + tuple(int(f * context) for f in KV_BUDGET_FRACTIONS) if WORKLOADS[workload] == "decode" else (0,)
    return replace(base, kv_budget=budgets)


def choose(every: list[Measured], target: Target, planner: Planner) -> Measured | None:
    """The measured point that meets `target` (None if none does)."""
    front = pareto(every)
    if target.max_perplexity_increase is not None:
        return best_within(front, 1 + target.max_perplexity_increase)
    if target.target_speedup is not None:
        return cheapest_reaching(front, target.target_speedup)
    ok = [m for m in every if planner.quality(m.point).flops_fraction <= target.flops_budget]
    return min(ok, key=lambda m: (m.quality, -m.speedup)) if ok else None


def probe_points(lattice: Lattice) -> list[Point]:
    """Dense and plans that move the cost model's features apart: each axis at its middle and last
    setting, and one combination."""
    def mid(ladder):
        return ladder[max(1, len(ladder) // 2)]
    probes = [Point()]
    for axis in ("width", "depth", "prefill_keep", "kv_budget"):
        ladder = lattice.ladder(axis)
        if len(ladder) > 1:
            probes += [replace(Point(), **{axis: v}) for v in dict.fromkeys((ladder[1] if axis == "kv_budget"
                                                                             else mid(ladder), ladder[-1]))]
    if len(lattice.depth) > 1 and len(lattice.width) > 1:
        probes.append(Point(depth=mid(lattice.depth), width=mid(lattice.width)))
    return list(dict.fromkeys(probes))


def explore(planner: Planner, phase: str, single_axis: bool = False) -> tuple[SearchResult, dict[str, list[Measured]]]:
    """The greedy path for `phase` and, with `single_axis`, each axis's own ladder (the fronts the
    joint one is compared with). Quality is cached in `planner`, so a second phase re-measures
    nothing it already has."""
    lattice = planner.settings.lattice
    measure = planner.measure(phase)
    search = greedy_path(lattice, measure, planner.settings.search_limit)
    singles: dict[str, list[Measured]] = {}
    if single_axis:
        for axis in AXES:
            if len(lattice.ladder(axis)) > 1:
                singles[axis] = [measure(Point())] + [measure(p) for p in lattice.single_axis(axis)]
    return search, singles


def profiles_of(planner: Planner, phase: str) -> dict[str, Point]:
    """lossless (dense weights), balanced and aggressive (fastest on the front within their limits,
    and at least MIN_PROFILE_GAIN faster than dense, else dense), long-context (least KV memory per
    sequence at LONG_CONTEXT tokens within its limit)."""
    every = [planner.measure(phase)(p) for p in planner.qualities]
    front = pareto(every)
    profiles = {"lossless": Point()}
    for name, limit in PROFILE_LIMITS.items():
        if name == "long-context":
            ok = [m for m in every if m.quality <= limit]
            best = min(ok, key=lambda m: (planner.kv_bytes(m.point), -m.speedup)) if ok else None
        else:
            best = best_within([m for m in front if m.speedup >= MIN_PROFILE_GAIN], limit)
        profiles[name] = best.point if best else Point()
    return profiles


def describe(planner: Planner, point: Point, timed: dict[Point, list[tuple[float, float]]]) -> dict:
    """A point's quality, predicted speedups, KV memory and, when timed, measured speedups."""
    q, pred = planner.quality(point), planner.predicted(point)
    row = {"plan": point.label, "point": asdict(point), "axes": point.axes, "perplexity": q.perplexity,
           "perplexity_ratio": q.ratio, "token_agreement": q.token_agreement,
           "flops_fraction": q.flops_fraction, "predicted_decode_speedup": pred["decode"],
           "predicted_prefill_speedup": pred["prefill"],
           "kv_bytes_long_context": planner.kv_bytes(point),
           "kv_fraction_long_context": planner.kv_bytes(point) / planner.kv_bytes(Point())}
    if point in timed and Point() in timed:
        measured = planner.measured(timed, point)
        row["measured_decode_speedup"] = measured["decode"]
        row["measured_prefill_speedup"] = measured["prefill"]
    return row


def run(model: str, data: Path, out_dir: Path | None, target: Target, workload: str = "decode",
        settings: Settings | None = None) -> dict:
    """The whole planning run; writes plans and `plan-report.json` into `out_dir`, returns the report."""
    target.check()
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got {workload!r}")
    settings = settings or Settings()
    settings = replace(settings, lattice=lattice_for(workload, settings.context, settings.lattice))
    if not Path(data).is_file():
        raise ValueError(f"calibration data {data} is not a file")
    planner = Planner(model, Path(data), out_dir, settings)
    try:
        settings = planner.settings
        phase = WORKLOADS[workload]
        planner.fit_cost(probe_points(settings.lattice))
        search, _ = explore(planner, phase)
        every = [planner.measure(phase)(p) for p in planner.qualities]
        front = pareto(every)
        chosen = choose(every, target, planner)
        profiles = profiles_of(planner, phase)
        out = planner.out_dir
        written = {name: str(planner.plan_file(point, out, name)) for name, point in profiles.items()}
        if chosen is not None:
            written["chosen"] = str(planner.plan_file(chosen.point, out, "chosen"))
        else:                                   # no stale choice from an earlier run
            for stale in (out / "chosen.json", out / "chosen.safetensors"):
                stale.unlink(missing_ok=True)
        # The check: the chosen plan and the profiles timed against dense.
        to_time = list(dict.fromkeys([Point()] + list(profiles.values()) + ([chosen.point] if chosen else [])))
        timed = planner.time_points(to_time)
        report = {
            "model": planner.ingredients.llm.engine.model_name, "workload": workload, "phase": phase,
            "target": asdict(target), "settings": {k: v for k, v in asdict(settings).items() if k != "lattice"},
            "lattice": asdict(settings.lattice), "dense_perplexity": planner.dense_ppl,
            "cost_model": planner.cost_report(),
            "search": {"method": "greedy numerical gradient (engine/calibration/search.py)",
                       "path": [m.point.label for m in search.path], "moves": search.moves,
                       "measured_points": len(planner.qualities)},
            "points": [describe(planner, p, timed) for p in planner.qualities],
            "pareto": [m.point.label for m in front],
            "chosen": describe(planner, chosen.point, timed) if chosen else None,
            "profiles": {name: describe(planner, point, timed) for name, point in profiles.items()},
            "plans": written, "out_dir": str(out),
            "timed": {"dense_prefill_seconds": [r[0] for r in timed[Point()]],
                      "dense_decode_step_seconds": [r[1] for r in timed[Point()]],
                      "batch": settings.batch, "context": settings.context},
        }
        (out / "plan-report.json").write_text(json.dumps(report, indent=1))
    finally:
        planner.close()
    return report
