"""`trident calibrate`: run the dense model over text, collect what every axis needs, and write
the single-axis plan sweeps (width, depth, early exit) and the named profiles.

Each step is its own module: statistics (engine.calibration.statistics), width selection and
compensation (width, reconstruct), layer dropping (depth), exit probes (exits), healing (heal) and
held-out evaluation (evaluate). This module orders them, measures every plan on held-out text and
picks the profiles. `trident plan` (engine.calibration.planner) then combines the axes.
Optionally (`heal_steps`), chosen budgets are healed by distillation on the calibration text
outside the held-out end, keeping the step that scores best on validation windows just before it,
and their plans carry the trained weights.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from trident.engine.calibration.depth import (DEPTH_BUDGETS, DEPTH_COMPENSATIONS, budgets_for, collect_run_moments,
                                              depth_plan, rank_layers, sweep_runs)
from trident.engine.calibration.evaluate import perplexity, split_windows
from trident.engine.calibration.exits import DEFAULT_AGREEMENT, calibrate_exits, default_exit_layers, exit_plan
from trident.engine.calibration.heal import heal_plan
from trident.engine.calibration.reconstruct import COMPENSATIONS
from trident.engine.calibration.statistics import collect_stats, importance
from trident.engine.calibration.width import WIDTH_BUDGETS, check_head_unit, width_plan
from trident.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from trident.engine.llm import LLM
from trident.engine.loader import load_checkpoint
from trident.engine.pruning.plan import PruningPlan
from trident.engine.pruning.profiles import profile_dir

log = logging.getLogger(__name__)
HEAL_BUDGETS = (0.20, 0.25)              # healed when heal_steps > 0 (each costs heal_steps steps)
HEAL_VAL_WINDOWS = 8                     # real windows before the held-out end that pick the healing step
PROFILE_LIMITS = {"balanced": 1.10, "aggressive": 1.30}   # max perplexity ratio to dense
EXIT_TRAIN_WINDOWS = 12       # calibration windows the exit probes are fitted on
EXIT_CHECK_WINDOWS = 4        # the windows after them, which pick the thresholds



def calibrate(model: str, data: Path, num_tokens: int = 32768, eval_tokens: int = 4096, window: int = 512,
              out_dir: Path | None = None, dtype: str = "float32", heal_steps: int = 0,
              heal_budgets: tuple[float, ...] = HEAL_BUDGETS, heal_lr: float = 2e-4,
              compensation: str = "least-squares", head_unit: str = "head",
              depth_compensation: str = "least-squares", heal_depths: tuple[int, ...] = (),
              exit_layers: tuple[int, ...] | None = None, exit_agreement: float = DEFAULT_AGREEMENT) -> dict:
    """Collect statistics, write importance.json, the width and depth sweeps and the named
    profiles (chosen among width plans); returns a report.

    Depth: `depth-N.json` drops the N layers of lowest Block Influence for every N of DEPTH_BUDGETS
    below the model's layer count, compensated by `depth_compensation` (engine.calibration.depth);
    with heal_steps > 0 the budgets in `heal_depths` are healed like width plans.

    head_unit: "head" drops single query heads, "group" whole KV groups (width_plan).

    Early exit: `exit.json` is the dense model with exit points after `exit_layers` (default: from
    half the depth on, engine.calibration.exits), probes fitted on up to EXIT_TRAIN_WINDOWS calibration
    windows and thresholds picked on the next EXIT_CHECK_WINDOWS for `exit_agreement`.

    compensation: "least-squares" refits o_proj / down_proj (engine.calibration.reconstruct), "bias"
    only adds the removed channels' mean. heal_steps > 0 then heals the plans of `heal_budgets`
    (engine.calibration.heal) on every window of the text before the held-out end but the last
    HEAL_VAL_WINDOWS, which choose the step whose weights the plan keeps."""
    if num_tokens < window or eval_tokens < window:
        raise ValueError(f"calibration ({num_tokens}) and evaluation ({eval_tokens}) tokens must each fill at least "
                         f"one window of {window} tokens")
    if heal_steps < 0:
        raise ValueError(f"heal steps must be >= 0, got {heal_steps}")
    if heal_steps > 0 and not (math.isfinite(heal_lr) and heal_lr > 0):
        raise ValueError(f"heal learning rate must be a positive number, got {heal_lr}")
    if compensation not in COMPENSATIONS:
        raise ValueError(f"compensation must be one of {COMPENSATIONS}, got {compensation!r}")
    check_head_unit(head_unit)
    unknown = [b for b in heal_budgets if not any(math.isclose(b, w) for w in WIDTH_BUDGETS)]
    if heal_steps > 0 and unknown:
        raise ValueError(f"heal budgets {unknown} are not among the width budgets {list(WIDTH_BUDGETS)}")
    if depth_compensation not in DEPTH_COMPENSATIONS:
        raise ValueError(f"depth compensation must be one of {DEPTH_COMPENSATIONS}, got {depth_compensation!r}")
    if heal_steps > 0 and set(heal_depths) - set(DEPTH_BUDGETS):
        raise ValueError(f"heal depths {sorted(set(heal_depths) - set(DEPTH_BUDGETS))} are not among the depth "
                         f"budgets {list(DEPTH_BUDGETS)}")
    if not Path(data).is_file():
        raise ValueError(f"calibration data {data} is not a file")
    if not 0.0 < exit_agreement <= 1.0:
        raise ValueError(f"exit agreement must be in (0, 1], got {exit_agreement}")
    # Prefix caching off: windows that share leading blocks must still each run in full.
    base = EngineConfig(model=model, dtype=dtype, cache=CacheConfig(enable_prefix_caching=False),
                        scheduler=SchedulerConfig(max_model_len=window + 1, max_num_batched_tokens=window))
    llm = LLM(base)
    depths = budgets_for(llm.engine.model_config.num_layers)
    num_layers = llm.engine.model_config.num_layers
    exit_layers = tuple(default_exit_layers(num_layers)) if exit_layers is None else tuple(sorted(set(exit_layers)))
    if any(not 0 <= i < num_layers - 1 for i in exit_layers):
        raise ValueError(f"exit layers must be in [0, {num_layers - 1}) (an exit after the last layer skips "
                         f"nothing), got {list(exit_layers)}")
    if heal_steps > 0 and set(heal_depths) - set(depths):
        raise ValueError(f"heal depths {sorted(set(heal_depths) - set(depths))} leave no layer of "
                         f"{llm.engine.model_config.num_layers}")
    text = Path(data).read_text()
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < num_tokens + eval_tokens:
        raise ValueError(f"{data} has {len(ids)} tokens, fewer than {num_tokens} calibration + {eval_tokens} "
                         f"held-out evaluation tokens (lower --tokens or --eval-tokens)")
    calib = split_windows(ids[:num_tokens], window)
    held_out = split_windows(ids[-eval_tokens:], window)
    heal_windows, val_windows = [], []
    if heal_steps > 0:
        # Everything but the held-out end, with a window's margin before it.
        real = split_windows(ids[:len(ids) - eval_tokens - window], window)
        if len(real) < 2:
            raise ValueError(f"{data} is too short to heal on windows of {window} tokens")
        num_val = max(1, min(HEAL_VAL_WINDOWS, len(real) // 4))
        heal_windows, val_windows = real[:-num_val], real[-num_val:]
    out_dir = Path(out_dir or profile_dir(llm.engine.model_name))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ".write-test").touch()
        (out_dir / ".write-test").unlink()
    except OSError as e:
        raise ValueError(f"cannot write plans to {out_dir}: {e}") from e
    stats = collect_stats(llm, calib)
    imp = importance(llm, stats)
    (out_dir / "importance.json").write_text(json.dumps(imp))
    dense_ppl = perplexity(llm, held_out)
    digest = PruningPlan.checkpoint_digest(load_checkpoint(model).state_dict)
    dense_plan = PruningPlan.dense(llm.engine.model_config)
    dense_plan.model["digest"] = digest
    dense_plan.save(out_dir / "dense.json")
    sweep = [{"plan": "dense", "width_fraction": 0.0, "perplexity": dense_ppl, "path": str(out_dir / "dense.json")}]

    def finish(plan: PruningPlan, tensors: dict[str, torch.Tensor], point: dict, heal_it: bool) -> dict:
        """Write `plan` (with its refit tensors, healed if `heal_it`) and measure it on held-out text."""
        plan.base_dir = out_dir
        plan.model["digest"] = digest
        if tensors:
            save_file(tensors, str(out_dir / f"{plan.name}.safetensors"))
            plan.weights = f"{plan.name}.safetensors"
        if heal_it:
            point["healing"] = heal_plan(plan, llm.engine.model, model, heal_windows, heal_steps, heal_lr,
                                         out_dir, val_windows)
        path = out_dir / f"{plan.name}.json"
        plan.save(path)
        pruned = LLM(EngineConfig(model=model, dtype=dtype, plan=str(path), cache=base.cache, scheduler=base.scheduler))
        return {**point, "perplexity": perplexity(pruned, held_out), "path": str(path)}

    for fraction in tqdm(WIDTH_BUDGETS, desc="evaluating width budgets"):
        plan, tensors = width_plan(imp, llm, fraction, f"width-{fraction:.2f}",
                                   stats if compensation == "least-squares" else None, head_unit)
        point = {"plan": plan.name, "width_fraction": fraction, "compensation": compensation, "head_unit": head_unit}
        heal_it = heal_steps > 0 and any(math.isclose(fraction, b) for b in heal_budgets)
        sweep.append(finish(plan, tensors, point, heal_it))
    order = rank_layers(imp)
    depth_stats = collect_run_moments(llm, calib, sweep_runs(order, depths))
    depth_sweep = []
    for n in tqdm(depths, desc="evaluating depth budgets"):
        plan, tensors, runs = depth_plan(imp, llm, n, f"depth-{n}", depth_compensation,
                                         [st.ffn_in for st in stats], depth_stats)
        point = {"plan": plan.name, "layers_dropped": n, "dropped": sorted(order[:n]),
                 "compensation": depth_compensation, "runs": runs}
        depth_sweep.append(finish(plan, tensors, point, heal_steps > 0 and n in heal_depths))
    exits = {}
    if exit_layers:
        check_from = max(1, len(calib) - EXIT_CHECK_WINDOWS)
        found = calibrate_exits(llm, calib[:min(check_from, EXIT_TRAIN_WINDOWS)], calib[check_from:] or calib[-1:],
                                list(exit_layers), (exit_agreement,))
        plan = exit_plan(llm.engine.model_config, found, exit_agreement, "exit", digest)
        plan.save(out_dir / "exit.json")
        exits = {str(i): {"threshold": e["thresholds"][exit_agreement], "temperature": e["temperature"],
                          "exit_rate": e["exit_rate"][exit_agreement],
                          "agreement": e["agreement"][exit_agreement], "base_agreement": e["base_agreement"]}
                 for i, e in found["layers"].items()}
    profiles = {}
    for profile, limit in PROFILE_LIMITS.items():
        ok = [p for p in sweep if p["perplexity"] <= limit * dense_ppl]
        best = max(ok, key=lambda p: p["width_fraction"])
        plan = PruningPlan.load(Path(best["path"]))
        plan.name = profile
        plan.save(out_dir / f"{profile}.json")
        profiles[profile] = best["plan"]
    report = {"model": llm.engine.model_name, "calibration_tokens": sum(map(len, calib)),
              "eval_tokens": sum(map(len, held_out)), "dense_perplexity": dense_ppl, "sweep": sweep,
              "layer_order": order, "depth_sweep": depth_sweep, "exit_agreement": exit_agreement, "exits": exits,
              "profiles": profiles, "out_dir": str(out_dir)}
    (out_dir / "calibration.json").write_text(json.dumps(report, indent=1))
    return report
