"""Static depth: layer-drop plans ranked by Block Influence, with compensation for what a dropped
layer added to the residual stream.

Block Influence (ShortGPT), BI = 1 - mean cos(x_in, x_out) over calibration tokens, is collected by
engine.calibration.statistics; a plan for a budget of n layers drops the n layers of lowest BI.

A maximal run of dropped layers j..l added delta = x_out(l) - x_in(j) to the residual stream. The
kept layer k before the run (k = j - 1) writes to that stream last, through its down_proj, so it
can carry what the run added (a run that starts at layer 0 has no such layer and goes
uncompensated). With h the down_proj input of layer k and W its weight, compensation is one of:
- "least-squares": refit [W', b] = argmin E || W h + delta - (W' h + b) ||^2 + lam || W' - W ||^2,
  the part of delta that is linear in h moves into W' and its mean into the bias b; lam as in
  engine.calibration.reconstruct (ridge toward the original weight, so lam -> inf gives "bias");
- "bias": b = E[delta] only (the run's mean contribution);
- "none": plain dropping.
All moments are of the dense model on the calibration text (each run repaired against dense
inputs, as width compensation is). `RunMoments` also gives, per fit, the fraction of E||delta||^2
it leaves unexplained on that text, which calibration.json records for every run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from trident.engine.calibration.passes import prefill_windows
from trident.engine.calibration.reconstruct import DAMPING
from trident.engine.pruning.plan import PruningPlan

if TYPE_CHECKING:
    from trident.engine.llm import LLM
    from trident.engine.calibration.statistics import RunningMoments

DEPTH_BUDGETS = (1, 2, 3, 4, 6, 8)          # layers dropped, one plan each
DEPTH_COMPENSATIONS = ("least-squares", "bias", "none")


def rank_layers(imp: dict) -> list[int]:
    """Layer indices from least to most influential (ascending BI; ties keep layer order)."""
    bi = [layer["block_influence"] for layer in imp["layers"]]
    return sorted(range(len(bi)), key=lambda i: (bi[i], i))


def budgets_for(num_layers: int, budgets: tuple[int, ...] = DEPTH_BUDGETS) -> list[int]:
    """The budgets that leave at least one layer."""
    return [n for n in budgets if 0 < n < num_layers]


def dropped_runs(dropped: list[int]) -> list[tuple[int | None, list[int]]]:
    """[(kept layer before the run or None, [consecutive dropped layers])] for sorted `dropped`."""
    runs: list[list[int]] = []
    for i in sorted(dropped):
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return [(run[0] - 1 if run[0] > 0 else None, run) for run in runs]


@dataclass
class RunMoments:
    """Sums over calibration tokens of a dropped run's delta [hidden] against the down_proj input
    h [intermediate] of the kept layer before it (float64)."""

    cross: torch.Tensor | None = None       # sum delta h^T  [hidden, intermediate]
    delta: torch.Tensor | None = None       # sum delta      [hidden]
    delta_sq: float = 0.0                   # sum ||delta||^2
    count: int = 0

    def add(self, delta: torch.Tensor, h: torch.Tensor) -> None:
        delta, h = delta.detach().double(), h.detach().double()
        cross, total = delta.T @ h, delta.sum(0)
        self.cross = cross if self.cross is None else self.cross + cross
        self.delta = total if self.delta is None else self.delta + total
        self.delta_sq += delta.pow(2).sum().item()
        self.count += delta.shape[0]

    def unexplained(self, weight: torch.Tensor, ffn_in: "RunningMoments", refit: torch.Tensor | None,
                    bias: torch.Tensor) -> float:
        """E || (W - W') h + delta - b ||^2 / E || delta ||^2 on the calibration text (W' = W when
        `refit` is None): the share of the run's contribution the compensation misses."""
        n = self.count
        mean_h, gram = ffn_in.mean, ffn_in.gram
        diff = torch.zeros_like(weight, dtype=torch.float64) if refit is None else weight.double() - refit.double()
        bias = bias.double()
        e_delta_sq = self.delta_sq / n
        e_h_delta = self.cross.T / n                                     # E[h delta^T]  [intermediate, hidden]
        err = (torch.einsum("oi,ij,oj->", diff, gram, diff)
               + 2 * (torch.einsum("oi,io->", diff, e_h_delta) - diff @ mean_h @ bias)
               + e_delta_sq - 2 * bias @ (self.delta / n) + bias @ bias)
        return max(err.item(), 0.0) / max(e_delta_sq, 1e-30)


@dataclass
class DepthStats:
    """What compensation needs for every run the sweep drops: {(k, first, last): RunMoments}."""

    runs: dict[tuple[int, int, int], RunMoments] = field(default_factory=dict)


def sweep_runs(order: list[int], budgets: list[int]) -> set[tuple[int, int, int]]:
    """Every compensable run (kept layer before it, first, last) of the sweep's plans."""
    keys = set()
    for n in budgets:
        for k, run in dropped_runs(order[:n]):
            if k is not None:
                keys.add((k, run[0], run[-1]))
    return keys


def collect_run_moments(llm: "LLM", windows: list[list[int]], keys: set[tuple[int, int, int]]) -> DepthStats:
    """One pass of the dense model over `windows` accumulating each run's RunMoments. The engine's
    model must be dense (its layer list index = layer index) and run without length pruning, so
    every hook sees the same rows."""
    layers = llm.engine.model.layers
    if len(layers) != llm.engine.model_config.num_layers:
        raise ValueError("run moments need the dense model")
    stats = DepthStats({key: RunMoments() for key in keys})
    h: dict[int, torch.Tensor] = {}          # down_proj input of layer k, this forward
    x_in: dict[int, torch.Tensor] = {}       # residual entering layer j, this forward
    hooks = []
    for k in {k for k, _, _ in keys}:
        hooks.append(layers[k].mlp.down_proj.register_forward_pre_hook(
            lambda m, a, k=k: h.__setitem__(k, a[0].detach())))
    for j in {j for _, j, _ in keys}:
        hooks.append(layers[j].register_forward_pre_hook(lambda m, a, j=j: x_in.__setitem__(j, a[0].detach())))
    for last in {l for _, _, l in keys}:
        def end_of_run(m, a, out, last=last):
            for (k, j, l), moments in stats.runs.items():
                if l == last:
                    moments.add(out - x_in[j], h[k])
        hooks.append(layers[last].register_forward_hook(end_of_run))
    prefill_windows(llm, windows, hooks, "depth statistics")
    return stats


def refit_down_proj(weight: torch.Tensor, ffn_in: "RunningMoments", run: RunMoments,
                    damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """(W' [hidden, intermediate], b [hidden]) in float64: the least-squares fit above.

    With z = [h; 1], G = E[z z^T] (ridge lam on the h block) and the target's cross moment
    E[(W h + delta) z^T] + lam [W, 0], [W', b] = RHS G^-1."""
    w = weight.detach().double()
    n = w.shape[1]
    mean_h, gram = ffn_in.mean.double(), ffn_in.gram.double()
    g = torch.empty(n + 1, n + 1, dtype=torch.float64)
    g[:n, :n] = gram
    g[:n, n] = g[n, :n] = mean_h
    g[n, n] = 1.0
    lam = damping * gram.diagonal().mean().clamp_min(1e-12)
    g.diagonal()[:n] += lam
    rhs = torch.cat([w @ gram + run.cross / run.count, (w @ mean_h + run.delta / run.count)[:, None]], dim=1)
    rhs[:, :n] += lam * w
    sol = torch.cholesky_solve(rhs.T, torch.linalg.cholesky(g)).T       # [hidden, n + 1]
    return sol[:, :n].contiguous(), sol[:, n].contiguous()


def depth_plan(imp: dict, llm: "LLM", num_drop: int, name: str, compensation: str = "least-squares",
               ffn_in: list["RunningMoments"] | None = None, depth_stats: DepthStats | None = None,
               ) -> tuple[PruningPlan, dict[str, torch.Tensor], list[dict]]:
    """Drop the `num_drop` layers of lowest BI. Returns the plan, the refit down_proj tensors (HF
    names) for its weights file, and per run {"layers", "compensated_by", "unexplained": {fit: share}}.
    "least-squares" and "bias" need `ffn_in` (each layer's down_proj input moments) and
    `depth_stats` holding every compensable run of this plan."""
    if compensation not in DEPTH_COMPENSATIONS:
        raise ValueError(f"depth compensation must be one of {DEPTH_COMPENSATIONS}, got {compensation!r}")
    if compensation != "none" and (ffn_in is None or depth_stats is None):
        raise ValueError(f"{compensation!r} depth compensation needs the calibration moments")
    cfg = llm.engine.model_config
    if not 0 < num_drop < cfg.num_layers:
        raise ValueError(f"can drop 1..{cfg.num_layers - 1} of {cfg.num_layers} layers, not {num_drop}")
    plan = PruningPlan.dense(cfg)
    plan.name = name
    dropped = sorted(rank_layers(imp)[:num_drop])
    for i in dropped:
        plan.layers[i].keep = False
    tensors, runs = {}, []
    for k, run in dropped_runs(dropped):
        record = {"layers": run, "compensated_by": None if compensation == "none" else k}
        runs.append(record)
        if k is None or depth_stats is None:        # nothing before the run, or plain dropping
            continue
        moments = depth_stats.runs[(k, run[0], run[-1])]
        weight = llm.engine.model.layers[k].mlp.down_proj.weight.detach().double()
        refit, ls_bias = refit_down_proj(weight, ffn_in[k], moments)
        mean = moments.delta / moments.count
        record["unexplained"] = {"none": 1.0, "bias": moments.unexplained(weight, ffn_in[k], None, mean),
                                 "least-squares": moments.unexplained(weight, ffn_in[k], refit, ls_bias)}
        if compensation == "least-squares":
            plan.layers[k].ffn_bias = ls_bias.tolist()
            tensors[f"model.layers.{k}.mlp.down_proj.weight"] = refit.float()
        elif compensation == "bias":
            plan.layers[k].ffn_bias = mean.tolist()
    return plan, tensors, runs
