"""Where named plan profiles live, and turning `--plan` into a PruningPlan.

`trident calibrate` writes `balanced` and `aggressive` (width plans) into
`<cache>/plans/<model name>/`; `trident plan` writes `lossless`, `balanced`, `aggressive` and
`long-context` (plans across every axis) into the same folder, replacing calibrate's, so the last
command run decides. `--plan balanced` reads the file back. `dense` needs no calibration. Any
other value is a path to a plan file.
"""
from __future__ import annotations

from pathlib import Path

from trident.engine.config import ModelConfig
from trident.engine.loader import cache_root
from trident.engine.pruning.plan import PlanError, PruningPlan

PROFILES = ("dense", "lossless", "balanced", "aggressive", "long-context")


def profile_dir(model_name: str) -> Path:
    return cache_root() / "plans" / Path(model_name).name


def resolve_plan(plan: str, config: ModelConfig, model_name: str) -> PruningPlan:
    """A plan from a profile name or a JSON path."""
    if plan == "dense":
        return PruningPlan.dense(config)
    path = Path(plan)
    if plan in PROFILES:
        path = profile_dir(model_name) / f"{plan}.json"
        if not path.exists():
            writer = "calibrate" if plan in ("balanced", "aggressive") else "plan --max-perplexity-increase 0.05"
            raise PlanError(f"no {plan!r} plan for {model_name}: run `trident {writer} --model {model_name}` "
                            f"first (it writes {path})")
    elif not path.exists():
        raise PlanError(f"plan {plan!r} is neither a profile ({', '.join(PROFILES)}) nor an existing file")
    return PruningPlan.load(path)     # validated against the model by apply_plan
