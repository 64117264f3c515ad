"""Early-exit calibration, after CALM (Schuster et al. 2022): at each exit layer a linear probe on
the final-normed state predicts whether the prediction there (the final norm and the LM head
applied to that layer's output) equals the full model's; a token exits when the probe's
probability reaches the layer's threshold.

Untrained exit states are overconfident through the final norm and LM head: each exit gets a
temperature, the one (of TEMPERATURES) whose softened distribution is closest to the full model's
(cross-entropy against its probabilities) on the calibration tokens whose early argmax agrees.

The probe is a logistic regression fitted on calibration text. Each layer's threshold is the
lowest at which, on held-out tokens, the tokens the probe lets out agree with the full model at
least `target` of the time (1.0, the highest, when no threshold does). Thresholds are per layer
and independent; the engine tries the exits in order, so a token leaves at the first that fires.
The engine fills an exited token's deeper K/V from its exit state, which the teacher-forced
statistics here do not see: `bench/early_exit.py` measures what the engine's output loses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from trident.engine.pruning.plan import ExitPoint, PruningPlan
from trident.engine.sampling_params import SamplingParams
from trident.kernels.fused_norm import rms_norm_ref

if TYPE_CHECKING:
    from trident.engine.llm import LLM

EXIT_FRACTIONS = (0.5, 0.625, 0.75, 0.875)     # default exit layers, as fractions of the depth
DEFAULT_AGREEMENT = 0.95
TEMPERATURES = (0.8, 0.9, 1.0, 1.15, 1.3, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.5, 8.0)
TEMPERATURE_ROWS = 128        # agreeing tokens per window and layer the temperature is fitted on


def default_exit_layers(num_layers: int) -> list[int]:
    """Layer indices after which tokens may exit: from half the depth on, never the last layer."""
    return sorted({min(num_layers - 2, max(0, round(f * num_layers) - 1)) for f in EXIT_FRACTIONS})


@dataclass
class ExitData:
    features: torch.Tensor      # [N, hidden] float32: the final-normed state after the layer
    agrees: torch.Tensor        # [N] bool: its prediction equals the full model's
    cross_entropy: torch.Tensor | None = None   # [len(TEMPERATURES)] summed over agreeing tokens


def collect_exit_data(llm: LLM, windows: list[list[int]], layers: list[int], desc: str = "exit statistics") -> dict[int, ExitData]:
    """Per exit layer, every window token's normed state and whether its early argmax is final."""
    model = llm.engine.model
    position = {layer.spec.index: i for i, layer in enumerate(model.layers)}
    missing = [i for i in layers if i not in position]
    if missing:
        raise ValueError(f"exit layers {missing} are not in the served model")
    norm_w, eps = model.norm.weight, model.norm.eps
    states: dict[int, torch.Tensor] = {}
    final: list[torch.Tensor] = []
    data: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in layers}
    temps = torch.tensor(TEMPERATURES)
    cross_entropy = {i: torch.zeros(len(TEMPERATURES), dtype=torch.float64) for i in layers}

    def keep_state(i):
        def hook(module, args, out):
            states[i] = out.detach()
        return hook

    hooks = [model.layers[position[i]].register_forward_hook(keep_state(i)) for i in layers]
    hooks.append(model.norm.register_forward_hook(lambda m, a, out: final.append(out.detach())))
    try:
        for window in tqdm(windows, desc=desc, unit="window"):
            states.clear()
            final.clear()
            llm.generate([window], SamplingParams(max_tokens=0))
            with torch.inference_mode():
                final_logits = model.compute_logits(final[-1])
                target = final_logits.argmax(-1)
                for i in layers:
                    normed = rms_norm_ref(states[i], norm_w, eps)
                    logits = model.compute_logits(normed)
                    agrees = logits.argmax(-1) == target
                    data[i].append((normed.float().cpu(), agrees.cpu()))
                    rows = agrees.nonzero().squeeze(1)[:TEMPERATURE_ROWS]
                    if len(rows):
                        p = final_logits[rows].softmax(-1)
                        for t, temp in enumerate(temps):
                            cross_entropy[i][t] -= (p * (logits[rows] / temp).log_softmax(-1)).sum().double()
    finally:
        for h in hooks:
            h.remove()
    return {i: ExitData(torch.cat([f for f, _ in parts]), torch.cat([a for _, a in parts]), cross_entropy[i])
            for i, parts in data.items()}


def fit_probe(data: ExitData, steps: int = 100, l2: float = 1e-3) -> tuple[torch.Tensor, float]:
    """Logistic regression of `agrees` on `features` (L-BFGS, L2 on the weights): (weight, bias)."""
    x, y = data.features.double().clone(), data.agrees.double().clone()    # plain tensors: autograd reads them
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * w.pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(loss)
    return w.detach().float(), float(b.detach())


def probe_scores(data: ExitData, weight: torch.Tensor, bias: float) -> torch.Tensor:
    return torch.sigmoid(data.features @ weight + bias)


def pick_threshold(scores: torch.Tensor, agrees: torch.Tensor, target: float) -> float:
    """The lowest threshold whose exiting tokens (score >= threshold) agree at least `target` of
    the time; 1.0 when none does."""
    order = scores.argsort(descending=True)
    ranked = scores[order]
    precision = agrees[order].double().cumsum(0) / torch.arange(1, len(order) + 1, dtype=torch.float64)
    boundary = torch.ones(len(order), dtype=torch.bool)        # tied scores exit together
    boundary[:-1] = ranked[:-1] != ranked[1:]
    ok = ((precision >= target) & boundary).nonzero()
    return float(ranked[int(ok[-1])]) if len(ok) else 1.0


def calibrate_exits(llm: LLM, train: list[list[int]], held_out: list[list[int]], layers: list[int],
                    targets: tuple[float, ...] = (DEFAULT_AGREEMENT,)) -> dict:
    """Probes for `layers` fitted on `train`, thresholds on `held_out` for each target agreement.
    Returns {"layers": {layer: {"weight", "bias", "thresholds": {target: t}, "exit_rate": {target: r},
    "agreement": {target: a}, "base_agreement"}}}."""
    fit = collect_exit_data(llm, train, layers, "exit probes")
    check = collect_exit_data(llm, held_out, layers, "exit thresholds")
    out = {}
    for i in layers:
        weight, bias = fit_probe(fit[i])
        scores = probe_scores(check[i], weight, bias)
        entry = {"weight": weight, "bias": bias, "base_agreement": float(check[i].agrees.double().mean()),
                 "temperature": TEMPERATURES[int(fit[i].cross_entropy.argmin())] if fit[i].cross_entropy.any() else 1.0,
                 "thresholds": {}, "exit_rate": {}, "agreement": {}}
        for target in targets:
            t = pick_threshold(scores, check[i].agrees, target)
            exits = scores >= t
            entry["thresholds"][target] = t
            entry["exit_rate"][target] = float(exits.double().mean())
            entry["agreement"][target] = float(check[i].agrees[exits].double().mean()) if exits.any() else 1.0
        out[i] = entry
    return {"layers": out}


def exit_plan(config, calibration: dict, target: float, name: str, digest: str | None = None) -> PruningPlan:
    """A dense plan with an exit point at each calibrated layer, thresholds for `target`."""
    plan = PruningPlan.dense(config)
    plan.name = name
    if digest is not None:
        plan.model["digest"] = digest
    for i, entry in calibration["layers"].items():
        plan.layers[i].exit = ExitPoint(threshold=entry["thresholds"][target], probe_weight=entry["weight"].tolist(),
                                        probe_bias=entry["bias"], temperature=entry["temperature"])
    return plan
