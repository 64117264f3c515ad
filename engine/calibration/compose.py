"""One plan from a setting on every axis: the joint planner's unit of search.

A `Point` names how far each axis prunes: layers dropped (lowest Block Influence first), the
fraction of heads and FFN channels dropped in the layers that stay, early-exit thresholds (by the
agreement they were calibrated for), the fraction of prompt rows kept after a layer, and a KV
budget per sequence. `compose` builds the plan in that order, each axis on the result of the one
before: the layer drop and its least-squares repair first (engine.calibration.depth), then width
chosen among the layers left (a repaired down_proj is what the kept channels reproduce, and the
biases add up), then exits at the kept calibrated layers, then the length policy.

All statistics are the dense model's, collected once; the joint planner measures what each
combination actually loses rather than adding up single-axis losses.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from trident.engine.calibration.depth import DepthStats, depth_plan
from trident.engine.calibration.statistics import LayerStats
from trident.engine.calibration.width import width_plan
from trident.engine.pruning.length import budget_policy, default_prefill_layer
from trident.engine.pruning.plan import ExitPoint, LengthPolicy, PruningPlan

if TYPE_CHECKING:
    from trident.engine.llm import LLM

AXES = ("depth", "width", "exit", "prefill_keep", "kv_budget")


@dataclass(frozen=True)
class Point:
    depth: int = 0                    # layers dropped
    width: float = 0.0                # fraction of heads and FFN channels dropped in the kept layers
    exit: float | None = None         # agreement the exit thresholds were calibrated for; None = no exits
    prefill_keep: float = 1.0         # prompt rows kept after the prefill layer
    kv_budget: int = 0                # keys kept per sequence in decode; 0 = all

    @property
    def label(self) -> str:
        parts = [f"depth-{self.depth}" if self.depth else "", f"width-{self.width:g}" if self.width else "",
                 f"exit-{self.exit:g}" if self.exit is not None else "",
                 f"keep-{self.prefill_keep:g}" if self.prefill_keep < 1 else "",
                 f"kv-{self.kv_budget}" if self.kv_budget else ""]
        return "+".join(p for p in parts if p) or "dense"

    @property
    def axes(self) -> list[str]:
        """The axes this point prunes."""
        return [a for a, on in zip(AXES, (self.depth > 0, self.width > 0, self.exit is not None,
                                          self.prefill_keep < 1, self.kv_budget > 0)) if on]

    @property
    def runnable(self) -> bool:
        """Whether the engine runs this combination (exits do not combine with length pruning yet)."""
        return not (self.exit is not None and (self.prefill_keep < 1 or self.kv_budget > 0))


@dataclass
class Ingredients:
    """The dense model and its statistics, collected once per planning run."""

    llm: "LLM"                        # the dense engine the statistics came from
    imp: dict                         # engine.calibration.statistics.importance
    stats: list[LayerStats]           # width moments per layer
    depth_stats: DepthStats           # moments of every run of dropped layers the search may reach
    exits: dict | None                # engine.calibration.exits.calibrate_exits, thresholds per agreement
    digest: str                       # the checkpoint's digest, recorded in every plan
    prefill_recent: int = 0           # prompt tokens prefill dropping always keeps at the end


def compose(point: Point, ing: Ingredients, name: str) -> tuple[PruningPlan, dict[str, torch.Tensor]]:
    """The plan for `point` and its refit tensors (HF names) for the plan's weights file."""
    if not point.runnable:
        raise ValueError(f"{point.label}: early exits do not combine with length pruning")
    cfg = ing.llm.engine.model_config
    if point.depth:
        plan, tensors, _ = depth_plan(ing.imp, ing.llm, point.depth, name, "least-squares",
                                      [st.ffn_in for st in ing.stats], ing.depth_stats)
    else:
        plan, tensors = PruningPlan.dense(cfg), {}
    if point.width:
        plan, tensors = width_plan(ing.imp, ing.llm, point.width, name, ing.stats, base=plan, base_tensors=tensors)
    plan.name = name
    plan.model["digest"] = ing.digest
    if point.exit is not None:
        if ing.exits is None:
            raise ValueError("exit points need the exit calibration")
        last_kept = max(i for i, layer in enumerate(plan.layers) if layer.keep)
        for i, entry in ing.exits["layers"].items():
            if plan.layers[i].keep and i < last_kept:
                plan.layers[i].exit = ExitPoint(threshold=entry["thresholds"][point.exit],
                                                probe_weight=entry["weight"].tolist(), probe_bias=entry["bias"],
                                                temperature=entry["temperature"])
    policy = LengthPolicy()
    if point.prefill_keep < 1:
        policy = replace(policy, prefill_keep=[(prefill_layer(plan), point.prefill_keep)],
                         prefill_recent=ing.prefill_recent)
    if point.kv_budget:
        policy = budget_policy(point.kv_budget, policy)
    plan.length = policy
    return plan, tensors


def prefill_layer(plan: PruningPlan) -> int:
    """The layer prefill dropping prunes after: the default one, or the nearest kept layer before it
    (after it, when none is kept before)."""
    default = default_prefill_layer(len(plan.layers))
    kept = [i for i, layer in enumerate(plan.layers) if layer.keep]
    before = [i for i in kept if i <= default]
    return before[-1] if before else kept[0]
