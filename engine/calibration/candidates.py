"""The measurements a planning run makes: the dense model's statistics, every candidate plan
written and read once, its held-out quality (cached), steps timed side by side with dense, and KV
memory per sequence. `Planner` holds them; engine.calibration.planner decides with them.
"""
from __future__ import annotations

import gc
import logging
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from trident.engine.calibration.compose import Ingredients, Point, compose
from trident.engine.calibration.cost_model import FEATURES, CostModel, features, held_keys
from trident.engine.calibration.depth import budgets_for, collect_run_moments, rank_layers, sweep_runs
from trident.engine.calibration.evaluate import forced_continuation, split_windows
from trident.engine.calibration.exits import calibrate_exits, default_exit_layers
from trident.engine.calibration.search import Lattice, Measured
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

LONG_CONTEXT = 4096            # tokens per sequence the long-context profile's KV memory is counted at
SEARCH_LIMIT = 1.30            # the search stops past this perplexity ratio


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
