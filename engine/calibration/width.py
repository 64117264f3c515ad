"""Width plans: which attention heads and FFN channels to drop, spread across layers, and the
compensation of what they contributed.

Scores (engine.calibration.statistics.importance) are standardized per layer and pruned
globally, so a budget spreads non-uniformly across layers. The kept columns of o_proj / down_proj
are then refit by least squares to reproduce the dense output (engine.calibration.reconstruct),
or, without statistics, only the removed channels' mean contribution becomes a bias (FLAP).
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from trident.engine.calibration.reconstruct import refit_columns
from trident.engine.calibration.statistics import LayerStats, RunningMoments
from trident.engine.config import ModelConfig
from trident.engine.pruning.plan import HEAD_UNITS, PruningPlan

if TYPE_CHECKING:
    from trident.engine.llm import LLM

WIDTH_BUDGETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)


def _standardized(scores: list[list[float]]) -> list[torch.Tensor]:
    out = []
    for s in scores:
        t = torch.tensor(s, dtype=torch.float64)
        out.append((t - t.mean()) / (t.std() + 1e-12) if t.numel() > 1 else torch.zeros_like(t))
    return out


def _global_keep(scores: list[list[float]], fraction: float, min_keep: int) -> list[list[int]]:
    """Indices kept per layer after dropping the globally lowest `fraction` of standardized scores."""
    z = _standardized(scores)
    return _drop_lowest(z, int(round(fraction * sum(len(s) for s in scores))), min_keep)


def _drop_lowest(z: list[torch.Tensor], num_drop: int, min_keep: int) -> list[list[int]]:
    """Indices kept per layer after dropping the `num_drop` globally lowest scores of `z`, each
    layer keeping at least `min_keep`."""
    keep = [list(range(len(s))) for s in z]
    if num_drop == 0:
        return keep
    order = torch.argsort(torch.cat(z), stable=True).tolist()
    owner = [(l, i) for l, s in enumerate(z) for i in range(len(s))]
    dropped: list[set[int]] = [set() for _ in z]
    for idx in order:
        if num_drop == 0:
            break
        l, i = owner[idx]
        if len(z[l]) - len(dropped[l]) > min_keep:
            dropped[l].add(i)
            num_drop -= 1
    return [[i for i in k if i not in d] for k, d in zip(keep, dropped)]


def _global_keep_groups(scores: list[list[float]], fraction: float, group: int) -> list[list[int]]:
    """Query heads kept per layer when whole KV groups (a KV head and its `group` query heads) go.

    A group scores the sum of its heads' standardized scores. As many groups go as remove the
    attention weights that dropping `fraction` of the query heads would (a query head is its
    q_proj rows and o_proj columns; a group adds its k_proj and v_proj rows), so the two head units
    spend a budget alike. Every layer keeps at least one group."""
    z = _standardized(scores)
    num_heads = sum(len(s) for s in scores)
    num_drop = int(round(fraction * num_heads * 2 / (2 * group + 2)))
    kept_groups = _drop_lowest([t.view(-1, group).sum(1) for t in z], num_drop, min_keep=1)
    return [[g * group + j for g in kept for j in range(group)] for kept in kept_groups]


def check_head_unit(head_unit: str) -> None:
    """ValueError unless `head_unit` is one width_plan knows (calibrate checks before its statistics)."""
    if head_unit not in HEAD_UNITS:
        raise ValueError(f"head unit must be one of {HEAD_UNITS}, got {head_unit!r}")


def width_plan(imp: dict, llm: LLM, fraction: float, name: str, stats: list[LayerStats] | None = None,
               head_unit: str = "head", base: PruningPlan | None = None,
               base_tensors: dict[str, torch.Tensor] | None = None) -> tuple[PruningPlan, dict[str, torch.Tensor]]:
    """Drop `fraction` of query heads and of FFN channels, spread non-uniformly across layers.

    head_unit "head" drops single query heads; "group" drops whole KV groups (see
    _global_keep_groups), which keeps every layer's groups equal and shrinks its KV cache.

    Compensation: with `stats`, o_proj / down_proj are refit by least squares on the calibration
    moments (engine.calibration.reconstruct) and returned as sliced HF-named tensors for the plan's
    weights file; without, the removed channels' mean contribution becomes the bias (FLAP).

    `base` (with its refit `base_tensors`) is a plan to prune further, e.g. a layer-drop plan: its
    dropped layers stay dropped and do not count toward the budget, a refit weight of it is what
    the kept columns reproduce, and its biases add to the new ones."""
    cfg: ModelConfig = llm.engine.model_config
    base = base or PruningPlan.dense(cfg)
    base_tensors = base_tensors or {}
    present = [i for i, layer in enumerate(base.layers) if layer.keep]
    layers_imp = [imp["layers"][i] for i in present]
    group = cfg.num_heads // cfg.num_kv_heads
    head_scores = [l["head_scores"] for l in layers_imp]
    check_head_unit(head_unit)
    heads = (_global_keep(head_scores, fraction, min_keep=1) if head_unit == "head"
             else _global_keep_groups(head_scores, fraction, group))
    channel_scores = [l["channel_scores"] for l in layers_imp]
    for k, i in enumerate(present):
        # A down_proj the base refit (a layer-drop repair) weighs its channels anew.
        refit = base_tensors.get(f"model.layers.{i}.mlp.down_proj.weight")
        if refit is not None and stats is not None:
            channel_scores[k] = (stats[i].ffn_in.var * refit.double().pow(2).sum(0)).tolist()
    channels = _global_keep(channel_scores, fraction, min_keep=max(1, cfg.intermediate_size // 16))
    layers = [replace(layer) for layer in base.layers]
    tensors = dict(base_tensors)
    for i, li, kept_h, kept_c in zip(present, layers_imp, heads, channels):
        layer, plan, p = llm.engine.model.layers[i], layers[i], f"model.layers.{i}."
        if len(kept_h) < cfg.num_heads:
            plan.kept_q_heads = kept_h
            plan.kept_kv_heads = sorted({h // group for h in kept_h})
            kept = [h * cfg.head_dim + j for h in kept_h for j in range(cfg.head_dim)]
            weight = tensors.get(p + "self_attn.o_proj.weight", layer.self_attn.o_proj.weight)
            bias, w = _compensate(weight, kept, li["attn_in_mean"], stats[i].attn_in if stats else None)
            plan.attn_bias = _added(plan.attn_bias, bias)
            if w is not None:
                tensors[p + "self_attn.o_proj.weight"] = w
        if len(kept_c) < cfg.intermediate_size:
            plan.kept_ffn_channels = kept_c
            weight = tensors.get(p + "mlp.down_proj.weight", layer.mlp.down_proj.weight)
            bias, w = _compensate(weight, kept_c, li["ffn_in_mean"], stats[i].ffn_in if stats else None)
            plan.ffn_bias = _added(plan.ffn_bias, bias)
            if w is not None:
                tensors[p + "mlp.down_proj.weight"] = w
    return PruningPlan(name, PruningPlan.fingerprint(cfg), layers, replace(base.length)), tensors


def _added(old: list[float] | None, new: list[float]) -> list[float]:
    return new if old is None else [a + b for a, b in zip(old, new)]


def _compensate(weight: torch.Tensor, kept: list[int], mean: list[float],
                moments: RunningMoments | None) -> tuple[list[float], torch.Tensor | None]:
    """(bias, refit kept columns or None) for a projection whose input keeps columns `kept`."""
    w = weight.detach().double()
    if moments is not None:
        refit, bias = refit_columns(w, moments.gram, moments.mean, kept)
        return bias.tolist(), refit.float()
    dropped = sorted(set(range(w.shape[1])) - set(kept))
    return (w[:, dropped] @ torch.tensor(mean, dtype=torch.float64)[dropped]).tolist(), None

