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

import gc
import json
import logging
import math
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from trident.engine.calibration.compose import AXES, Ingredients, Point, compose
from trident.engine.calibration.cost_model import FEATURES, CostModel, features, held_keys
from trident.engine.calibration.depth import budgets_for, collect_run_moments, rank_layers, sweep_runs
from trident.engine.calibration.evaluate import forced_continuation, split_windows
from trident.engine.calibration.exits import calibrate_exits, default_exit_layers
from trident.engine.calibration.search import (Lattice, Measured, SearchResult, best_within, cheapest_reaching,
                                               greedy_path, pareto)
from trident.engine.calibration.statistics import collect_stats, importance
from trident.engine.calibration.timing import batch_params, lockstep_speed
from trident.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from trident.engine.llm import LLM
from trident.engine.llm_engine import DTYPES
from trident.engine.loader import load_checkpoint
from trident.engine.pruning.length import MIN_KV_BUDGET
from trident.engine.pruning.plan import PruningPlan
from trident.engine.pruning.profiles import profile_dir

log = logging.getLogger(__name__)

WORKLOADS = {"decode": "decode", "prefill": "prefill", "long-context": "decode"}   # workload -> timed phase
WORKLOAD_CONTEXT = {"decode": 1024, "prefill": 1024, "long-context": 4096}          # default prompt tokens
PROFILE_LIMITS = {"balanced": 1.05, "aggressive": 1.15, "long-context": 1.10}       # perplexity ratio to dense
LONG_CONTEXT = 4096            # tokens per sequence the long-context profile's KV memory is counted at
SEARCH_LIMIT = 1.30            # the search stops past this perplexity ratio
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


@dataclass
class Settings:
    """How much text and time the planning run spends."""

    context: int = 1024            # prompt tokens of every quality passage and timed sequence
    continuation: int = 128        # teacher-forced tokens scored after each prompt
    passages: int = 4              # held-out passages
    calibration_tokens: int = 16384
    window: int = 512              # statistics windows
    batch: int = 8                 # sequences of a timed decode step
    timed_steps: int = 16          # decode steps timed per round
    rounds: int = 2                # timing rounds (the first engine rotates)
    dtype: str = "float32"
    prefill_recent: int = 128      # prompt tokens prefill dropping always keeps at the end
    search_limit: float = SEARCH_LIMIT   # the search stops past this perplexity ratio
    lattice: Lattice = field(default_factory=Lattice)


@dataclass
class Quality:
    perplexity: float
    ratio: float                   # to dense
    token_agreement: float         # teacher-forced argmax equal to dense's
    flops_fraction: float          # executed / dense FLOPs of the quality run
    layer_fraction: float          # of the present layers, what an average decode token ran (exits)


class Planner:
    """Holds the statistics, the quality cache and the cost model of one planning run."""

    def __init__(self, model: str, data: Path, out_dir: Path | None, settings: Settings) -> None:
        self.model = model
        s = replace(settings, window=min(settings.window, settings.calibration_tokens))
        base = EngineConfig(model=model, dtype=s.dtype, cache=CacheConfig(enable_prefix_caching=False),
                            scheduler=SchedulerConfig(max_model_len=s.window + 1, max_num_batched_tokens=s.window))
        llm = LLM(base)
        self.config = llm.engine.model_config
        # Depth settings that leave at least one layer; KV budgets the engine accepts.
        s = self.settings = replace(s, lattice=replace(
            s.lattice, depth=tuple(d for d in s.lattice.depth if d < self.config.num_layers),
            kv_budget=tuple(b for b in s.lattice.kv_budget if b == 0 or b >= MIN_KV_BUDGET)))
        self.out_dir = Path(out_dir or profile_dir(llm.engine.model_name))
        self.work_dir = self.out_dir / "candidates"
        self.files: dict[Point, Path] = {}      # candidate plans written this run
        self.plans: dict[Point, PruningPlan] = {}   # ... and read back
        try:
            shutil.rmtree(self.work_dir, ignore_errors=True)      # never reuse another run's candidates
            self.work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot write plans to {self.out_dir}: {e}") from e
        ids = llm.tokenizer.encode(Path(data).read_text(encoding="utf-8"), add_special_tokens=False)
        passage = s.context + s.continuation
        need = s.calibration_tokens + (s.passages + s.batch) * passage
        if len(ids) < need:
            raise ValueError(f"{data} has {len(ids)} tokens, fewer than the {need} this run needs (calibration "
                             f"{s.calibration_tokens}, then {s.passages} held-out passages and {s.batch} timed "
                             f"prompts of {passage})")
        calib = split_windows(ids[:s.calibration_tokens], s.window)
        # Held out from the end; the timed prompts sit between calibration and held-out text.
        self.passages = split_windows(ids[len(ids) - s.passages * passage:], passage)
        middle = ids[s.calibration_tokens:len(ids) - s.passages * passage]
        self.speed_prompts = split_windows(middle[:s.batch * s.context], s.context)
        stats = collect_stats(llm, calib)
        imp = importance(llm, stats)
        order = rank_layers(imp)
        depths = budgets_for(self.config.num_layers, tuple(d for d in s.lattice.depth if d))
        depth_stats = collect_run_moments(llm, calib, sweep_runs(order, depths))
        exits = None
        agreements = tuple(a for a in s.lattice.exit if a is not None)
        if agreements:
            check = max(1, len(calib) - 4)
            exits = calibrate_exits(llm, calib[:check], calib[check:] or calib[-1:],
                                    default_exit_layers(self.config.num_layers), agreements)
        digest = PruningPlan.checkpoint_digest(load_checkpoint(model).state_dict)
        self.ingredients = Ingredients(llm, imp, stats, depth_stats, exits, digest, s.prefill_recent)
        self.dense_plan = PruningPlan.dense(self.config)
        self.qualities: dict[Point, Quality] = {}
        self.dense_argmax: list[list[int]] | None = None
        self.cost: CostModel | None = None
        self.timing: dict = {}

    # ------------------------------------------------------------------ plans

    def plan_file(self, point: Point, folder: Path | None = None, name: str | None = None) -> Path:
        """The plan of `point` (and its weights) as a file: a candidate in the work folder, written
        once per run, or, given `folder` and `name`, written there (replacing what was there)."""
        if folder is None and point in self.files:
            return self.files[point]
        target = folder or self.work_dir
        name = name or f"candidate-{len(self.files)}"
        plan, tensors = compose(point, self.ingredients, name if folder else point.label)
        path = target / f"{name}.json"
        weights = target / f"{name}.safetensors"
        if tensors:
            save_file(tensors, str(weights))
            plan.weights = weights.name
        else:
            weights.unlink(missing_ok=True)
        plan.save(path)
        if folder is None:
            self.files[point] = path
        return path

    def plan_of(self, point: Point) -> PruningPlan:
        """The plan of `point` (dense: the unpruned plan), read once from its candidate file."""
        if point == Point():
            return self.dense_plan
        if point not in self.plans:
            self.plans[point] = PruningPlan.load(self.plan_file(point))
        return self.plans[point]

    def engine(self, point: Point, num_seqs: int, context: int, extra: int) -> LLM:
        """An engine for `point` without prefix caching, its KV cache sized for `num_seqs` sequences
        and its step for all their prompts at once: no prompt is split into chunks (prefill dropping
        scores each chunk by its own last queries), whatever else the step holds."""
        s = self.settings
        max_len = context + extra + 8
        return LLM(EngineConfig(model=self.model, dtype=s.dtype,
                                plan=None if point == Point() else str(self.plan_file(point)),
                                cache=CacheConfig(enable_prefix_caching=False,
                                                  num_blocks=num_seqs * (-(-max_len // CacheConfig.block_size) + 1)),
                                scheduler=SchedulerConfig(max_model_len=max_len,
                                                          max_num_batched_tokens=num_seqs * (context + 1),
                                                          max_num_seqs=max(num_seqs, 1))))

    # ------------------------------------------------------------------ quality

    def quality(self, point: Point) -> Quality:
        """Held-out quality of `point` (cached): teacher-forced continuations through the engine."""
        if point in self.qualities:
            return self.qualities[point]
        if self.dense_argmax is None and point != Point():
            self.quality(Point())
        s = self.settings
        llm = self.engine(point, s.passages, s.context, s.continuation)
        forced = forced_continuation(llm, self.passages, s.context, None)
        logprobs = [lp for passage in forced for lp, _ in passage]
        argmax = [[a for _, a in passage] for passage in forced]
        ppl = math.exp(-statistics.fmean(logprobs))
        flops = llm.engine.total_flops
        kept = [layer.keep for layer in llm.engine.plan.layers] if llm.engine.plan else [True] * self.config.num_layers
        present = sum(kept)
        # An exited token ran the present layers below its exit (the accounting keys it by layer count).
        exited = sum(flops.exit_layer_tokens.values())
        layers_run = sum(sum(kept[:n]) * c for n, c in flops.exit_layer_tokens.items())
        mean_layers = (layers_run + (len(logprobs) - exited) * present) / len(logprobs)
        if self.dense_argmax is None:
            self.dense_argmax, self.dense_ppl = argmax, ppl
        pairs = [(a, b) for mine, ref in zip(argmax, self.dense_argmax) for a, b in zip(mine, ref)]
        q = Quality(ppl, ppl / self.dense_ppl, sum(a == b for a, b in pairs) / len(pairs),
                    flops.executed / flops.dense, mean_layers / present)
        self.qualities[point] = q
        log.info("%-40s perplexity %.3f (x%.3f), agreement %.3f", point.label, ppl, q.ratio, q.token_agreement)
        del llm
        gc.collect()
        return q

    # ------------------------------------------------------------------ speed

    def fit_cost(self, probes: list[Point]) -> CostModel:
        """Time `probes` (dense first) side by side and fit the cost model to their steps."""
        s = self.settings
        timed = self.time_points(probes)
        samples = {"decode": [], "prefill": []}
        for point in probes:
            plan = self.plan_of(point)
            prefill_s = statistics.median(r[0] for r in timed[point])
            decode_s = statistics.median(r[1] for r in timed[point])
            samples["decode"].append((features(plan, self.config, "decode", s.context, s.batch), decode_s))
            samples["prefill"].append((features(plan, self.config, "prefill", s.context, s.batch), prefill_s))
        self.cost = CostModel.fit(samples, s.context, s.batch)
        self.timing["probes"] = [{"plan": p.label, "prefill_seconds": [r[0] for r in timed[p]],
                                  "decode_step_seconds": [r[1] for r in timed[p]]} for p in probes]
        return self.cost

    def time_points(self, points: list[Point]) -> dict[Point, list[tuple[float, float]]]:
        """Per point, per round: (seconds to prefill one `context`-token prompt, seconds per decode
        step of `batch` sequences). Engines run side by side: decode in lockstep, one step each in
        turn; prefill as the time to first token of one prompt, each engine in turn, the order
        rotating every round."""
        s = self.settings
        llms = [self.engine(p, s.batch, s.context, s.timed_steps + 8) for p in points]
        prompt = self.speed_prompts[0]
        for llm in llms:          # warm-up: one short prompt through every code path
            llm.generate([prompt[:s.context // 4 or 1]], batch_params(2))
        rounds = []
        for r in range(s.rounds):
            decode = lockstep_speed(llms, [self.speed_prompts] * len(llms), s.timed_steps, first=r, warm_up=False)
            prefill = [0.0] * len(llms)
            for k in range(len(llms)):
                i = (r + k) % len(llms)
                start = time.perf_counter()
                llms[i].generate([prompt], batch_params(0))
                prefill[i] = time.perf_counter() - start
            rounds.append([(prefill[i], s.batch / decode[i][1]) for i in range(len(llms))])
        del llms
        gc.collect()
        return {p: [r[i] for r in rounds] for i, p in enumerate(points)}

    def measured(self, timed: dict[Point, list[tuple[float, float]]], point: Point) -> dict[str, float]:
        """Measured speedups over dense: per phase, the median over rounds of dense's time over
        this point's in the same round."""
        dense = timed[Point()]
        return {phase: statistics.median(d[k] / t[k] for d, t in zip(dense, timed[point]))
                for k, phase in enumerate(("prefill", "decode"))}

    def predicted(self, point: Point) -> dict[str, float]:
        """Predicted speedups over dense, per phase."""
        plan = self.plan_of(point)
        frac = self.quality(point).layer_fraction
        return {phase: self.cost.speedup(plan, self.dense_plan, self.config, phase, frac)
                for phase in ("decode", "prefill")}

    def cost_report(self) -> dict:
        return {"features": FEATURES, "weights": self.cost.weights, "residuals": self.cost.residuals,
                "probes": self.timing["probes"]}

    def close(self) -> None:
        """Remove the candidates' plan files (the written profiles stay)."""
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def measure(self, phase: str):
        def measure(point: Point) -> Measured:
            return Measured(point, self.quality(point).ratio, self.predicted(point)[phase])
        return measure

    # ------------------------------------------------------------------ memory

    def kv_bytes(self, point: Point, context: int = LONG_CONTEXT) -> float:
        """K/V bytes one sequence of `context` tokens holds under `point`'s plan (a KV budget caps
        its keys; prompt rows prefill dropping removes stay out of the layers after the cut)."""
        plan = self.plan_of(point)
        element = torch.finfo(DTYPES[self.settings.dtype]).bits // 8
        return sum(keys * 2 * len(plan.kv_heads_of(i, self.config)) * self.config.head_dim * element
                   for i, (layer, keys) in enumerate(zip(plan.layers, held_keys(plan, context))) if layer.keep)


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
