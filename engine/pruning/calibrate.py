"""Calibration: run the dense model over text, collect what every axis needs, write plans.

Statistics (one pass, through the engine's own forward code, via hooks):
- width: of the o_proj input (attention heads) and of the down_proj input (FFN), the mean and
  the second-moment matrix over calibration tokens (its diagonal gives FLAP's fluctuation metric);
- depth: Block Influence per layer, BI = 1 - mean cos(x_in, x_out); layer-drop plans and their
  compensation are engine.pruning.depth's (a second pass collects the moments it needs).
Width importance of a channel = variance * squared norm of its weight column; a head scores the
sum over its channels. Scores are standardized per layer and pruned globally, so the budget
spreads non-uniformly across layers. The kept columns of o_proj / down_proj are then refit by
least squares to reproduce the dense output (engine.pruning.reconstruct), or, with
compensation="bias", only the removed channels' mean contribution becomes a bias.
Optionally (`heal_steps`), chosen budgets are then healed by distillation (engine.pruning.heal) on
the calibration text outside the held-out end, keeping the step that scores best on validation
windows just before it, and their plans carry the trained weights.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from trident.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from trident.engine.llm import LLM
from trident.engine.loader import load_checkpoint
from trident.engine.model import LlamaModel
from trident.engine.pruning.apply import apply_plan
from trident.engine.pruning.depth import (DEPTH_BUDGETS, DEPTH_COMPENSATIONS, budgets_for, collect_run_moments,
                                          depth_plan, rank_layers, sweep_runs)
from trident.engine.pruning.exits import DEFAULT_AGREEMENT, calibrate_exits, default_exit_layers, exit_plan
from trident.engine.pruning.heal import heal, layer_tensors
from trident.engine.pruning.passes import prefill_windows
from trident.engine.pruning.plan import HEAD_UNITS, LayerPlan, PruningPlan
from trident.engine.pruning.reconstruct import COMPENSATIONS, refit_columns
from trident.engine.pruning.profiles import profile_dir

log = logging.getLogger(__name__)
WIDTH_BUDGETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
HEAL_BUDGETS = (0.20, 0.25)              # healed when heal_steps > 0 (each costs heal_steps steps)
HEAL_VAL_WINDOWS = 8                     # real windows before the held-out end that pick the healing step
PROFILE_LIMITS = {"balanced": 1.10, "aggressive": 1.30}   # max perplexity ratio to dense
EXIT_TRAIN_WINDOWS = 12       # calibration windows the exit probes are fitted on
EXIT_CHECK_WINDOWS = 4        # the windows after them, which pick the thresholds


class RunningMoments:
    """Per-channel mean and variance over rows, and the second-moment matrix E[x x^T] that
    least-squares compensation needs: each call's products in float32, running sums in float64.
    Memory: one [n, n] float64 matrix per hooked projection (0.6 GB for SmolLM2-135M's 30 layers)."""

    def __init__(self) -> None:
        self.count, self.total, self.outer = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        # One window's products in float32 (BLAS speed), the running sums in float64.
        s, outer = x.double().sum(0), (x.T @ x).double()
        self.total = s if self.total is None else self.total + s
        self.outer = outer if self.outer is None else self.outer + outer
        self.count += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def gram(self) -> torch.Tensor:
        return self.outer / self.count

    @property
    def var(self) -> torch.Tensor:
        return (self.outer.diagonal() / self.count - self.mean ** 2).clamp_min(0)


@dataclass
class LayerStats:
    attn_in: RunningMoments      # o_proj input, [num_heads * head_dim]
    ffn_in: RunningMoments       # down_proj input, [intermediate]
    cos_sum: float = 0.0         # sum over tokens of cos(x_in, x_out)
    tokens: int = 0


def collect_stats(llm: LLM, windows: list[list[int]]) -> list[LayerStats]:
    model = llm.engine.model
    stats = [LayerStats(RunningMoments(), RunningMoments()) for _ in model.layers]
    hooks = []
    for layer, st in zip(model.layers, stats):
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, st=st: st.attn_in.add(a[0])))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, st=st: st.ffn_in.add(a[0])))

        def block_influence(m, args, out, st=st):
            st.cos_sum += torch.nn.functional.cosine_similarity(args[0].double(), out.double(), dim=-1).sum().item()
            st.tokens += out.shape[0]
        hooks.append(layer.register_forward_hook(block_influence))
    prefill_windows(llm, windows, hooks, "calibrating")
    return stats


def importance(llm: LLM, stats: list[LayerStats]) -> dict:
    """Per-layer head scores, channel scores, compensation means, and BI (JSON-ready lists)."""
    cfg = llm.engine.model_config
    layers = []
    for layer, st in zip(llm.engine.model.layers, stats):
        w_o = layer.self_attn.o_proj.weight.detach().double()       # [hidden, q_size]
        w_down = layer.mlp.down_proj.weight.detach().double()       # [hidden, intermediate]
        head_channel = st.attn_in.var * w_o.pow(2).sum(0)
        layers.append({
            "head_scores": head_channel.view(cfg.num_heads, cfg.head_dim).sum(1).tolist(),
            "channel_scores": (st.ffn_in.var * w_down.pow(2).sum(0)).tolist(),
            "attn_in_mean": st.attn_in.mean.tolist(),
            "ffn_in_mean": st.ffn_in.mean.tolist(),
            "block_influence": 1.0 - st.cos_sum / max(st.tokens, 1),
        })
    return {"model": PruningPlan.fingerprint(cfg), "layers": layers}


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


def _check_head_unit(head_unit: str) -> None:
    """ValueError unless `head_unit` is one width_plan knows (calibrate checks before its statistics)."""
    if head_unit not in HEAD_UNITS:
        raise ValueError(f"head unit must be one of {HEAD_UNITS}, got {head_unit!r}")


def width_plan(imp: dict, llm: LLM, fraction: float, name: str, stats: list[LayerStats] | None = None,
               head_unit: str = "head") -> tuple[PruningPlan, dict[str, torch.Tensor]]:
    """Drop `fraction` of query heads and of FFN channels, spread non-uniformly across layers.

    head_unit "head" drops single query heads; "group" drops whole KV groups (see
    _global_keep_groups), which keeps every layer's groups equal and shrinks its KV cache.

    Compensation: with `stats`, o_proj / down_proj are refit by least squares on the calibration
    moments (engine.pruning.reconstruct) and returned as sliced HF-named tensors for the plan's
    weights file; without, the removed channels' mean contribution becomes the bias (FLAP)."""
    cfg: ModelConfig = llm.engine.model_config
    layers_imp = imp["layers"]
    group = cfg.num_heads // cfg.num_kv_heads
    head_scores = [l["head_scores"] for l in layers_imp]
    _check_head_unit(head_unit)
    heads = (_global_keep(head_scores, fraction, min_keep=1) if head_unit == "head"
             else _global_keep_groups(head_scores, fraction, group))
    channels = _global_keep([l["channel_scores"] for l in layers_imp], fraction,
                            min_keep=max(1, cfg.intermediate_size // 16))
    layers, tensors = [], {}
    for i, (layer, li, kept_h, kept_c) in enumerate(zip(llm.engine.model.layers, layers_imp, heads, channels)):
        plan = LayerPlan()
        p = f"model.layers.{i}."
        if len(kept_h) < cfg.num_heads:
            plan.kept_q_heads = kept_h
            plan.kept_kv_heads = sorted({h // group for h in kept_h})
            kept = [h * cfg.head_dim + j for h in kept_h for j in range(cfg.head_dim)]
            plan.attn_bias, w = _compensate(layer.self_attn.o_proj.weight, kept, li["attn_in_mean"],
                                            stats[i].attn_in if stats else None)
            if w is not None:
                tensors[p + "self_attn.o_proj.weight"] = w
        if len(kept_c) < cfg.intermediate_size:
            plan.kept_ffn_channels = kept_c
            plan.ffn_bias, w = _compensate(layer.mlp.down_proj.weight, kept_c, li["ffn_in_mean"],
                                           stats[i].ffn_in if stats else None)
            if w is not None:
                tensors[p + "mlp.down_proj.weight"] = w
        layers.append(plan)
    return PruningPlan(name, PruningPlan.fingerprint(cfg), layers), tensors


def _compensate(weight: torch.Tensor, kept: list[int], mean: list[float],
                moments: RunningMoments | None) -> tuple[list[float], torch.Tensor | None]:
    """(bias, refit kept columns or None) for a projection whose input keeps columns `kept`."""
    w = weight.detach().double()
    if moments is not None:
        refit, bias = refit_columns(w, moments.gram, moments.mean, kept)
        return bias.tolist(), refit.float()
    dropped = sorted(set(range(w.shape[1])) - set(kept))
    return (w[:, dropped] @ torch.tensor(mean, dtype=torch.float64)[dropped]).tolist(), None


def perplexity(llm: LLM, windows: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for w in windows:
        lps = llm.prompt_logprobs(w)
        nll -= sum(lps)
        count += len(lps)
    return math.exp(nll / count)


def token_windows(tokenizer, text: str, num_tokens: int, window: int, from_end: bool = False) -> list[list[int]]:
    """Consecutive `window`-token slices covering `num_tokens`, from the start (or end) of `text`."""
    chars = min(len(text), num_tokens * 8)
    part = text[-chars:] if from_end else text[:chars]
    ids = tokenizer.encode(part, add_special_tokens=False)
    return split_windows(ids[-num_tokens:] if from_end else ids[:num_tokens], window)


def split_windows(ids: list[int], window: int) -> list[list[int]]:
    """Consecutive whole `window`-token slices of `ids` (a shorter tail is left out)."""
    return [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]


def heal_plan(plan: PruningPlan, teacher: LlamaModel, model: str, windows: list[list[int]], steps: int,
              lr: float, out_dir: Path, val_windows: list[list[int]] | None = None) -> dict:
    """Heal the model `plan` slices from `model` (starting from its weights file, if any); write
    `<plan name>.safetensors` into `out_dir` and point `plan.weights` at it. Returns the first and
    last distillation losses and, with `val_windows`, the validation KL curve and the step kept."""
    ckpt = load_checkpoint(model)
    student = LlamaModel.from_hf_state_dict(ckpt.config, apply_plan(ckpt.state_dict, ckpt.config, plan),
                                            teacher.rotary.cos.shape[0], torch.float32,
                                            teacher.embed_tokens.weight.device)
    run = heal(teacher, student, windows, steps, lr, desc=f"healing {plan.name}", val_windows=val_windows)
    save_file(layer_tensors(student), str(out_dir / f"{plan.name}.safetensors"))
    plan.weights = f"{plan.name}.safetensors"
    return {"steps": steps, "lr": lr, "windows": len(windows), "val_windows": len(val_windows or []),
            "kl_first": run["losses"][0], "kl_last": run["losses"][-1], "val_kl": run["val"],
            "best_step": run["best_step"]}


def calibrate(model: str, data: Path, num_tokens: int = 32768, eval_tokens: int = 4096, window: int = 512,
              out_dir: Path | None = None, dtype: str = "float32", heal_steps: int = 0,
              heal_budgets: tuple[float, ...] = HEAL_BUDGETS, heal_lr: float = 2e-4,
              compensation: str = "least-squares", head_unit: str = "head",
              depth_compensation: str = "least-squares", heal_depths: tuple[int, ...] = (),
              exit_layers: tuple[int, ...] | None = None, exit_agreement: float = DEFAULT_AGREEMENT) -> dict:
    """Collect statistics, write importance.json, the width and depth sweeps and the named
    profiles (chosen among width plans); returns a report.

    Depth: `depth-N.json` drops the N layers of lowest Block Influence for every N of DEPTH_BUDGETS
    below the model's layer count, compensated by `depth_compensation` (engine.pruning.depth);
    with heal_steps > 0 the budgets in `heal_depths` are healed like width plans.

    head_unit: "head" drops single query heads, "group" whole KV groups (width_plan).

    Early exit: `exit.json` is the dense model with exit points after `exit_layers` (default: from
    half the depth on, engine.pruning.exits), probes fitted on up to EXIT_TRAIN_WINDOWS calibration
    windows and thresholds picked on the next EXIT_CHECK_WINDOWS for `exit_agreement`.

    compensation: "least-squares" refits o_proj / down_proj (engine.pruning.reconstruct), "bias"
    only adds the removed channels' mean. heal_steps > 0 then heals the plans of `heal_budgets`
    (engine.pruning.heal) on every window of the text before the held-out end but the last
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
    _check_head_unit(head_unit)
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
