"""Step time of a plan, predicted from its shape by a linear model fitted to timed steps.

A step's time on one device is close to linear in a few counts of its work:
- the layers it runs (a fixed cost per layer call: norms, RoPE, attention set-up, small ops);
- its projection FLOPs (rows times the layer's weights; at decode batch sizes this also tracks
  the weight bytes streamed);
- its attention FLOPs (rows times the keys they attend, per head);
- the rows whose key mass a KV budget scores, per layer (the mass, then the eviction choice and
  the bookkeeping of every sequence, every decode step);
- a constant (LM head rows, sampling, scheduling).
`features` counts them for a plan under a workload: a decode step of `batch` sequences at
`context` tokens, or the prefill of one `context`-token prompt, with prefill dropping shrinking
the rows of the layers after its cut (and the keys decode attends there) and a KV budget the keys
of every decode step. Early exits scale decode rows by the fraction of layers tokens ran in the
quality run.

`CostModel.fit` solves non-negative least squares over timed probe plans (the planner times a
handful side by side with dense, engine.calibration.timing), so the search can score thousands of
combinations without timing each; the planner then times the plans it chooses to check it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trident.engine.config import ModelConfig
from trident.engine.pruning.plan import PruningPlan

FEATURES = ("layers", "linear_gflop", "attention_gflop", "scored_row_layers", "constant")
PHASES = ("decode", "prefill")


def _layer_linear(config: ModelConfig, heads: int, kv_heads: int, channels: int) -> float:
    h, d = config.hidden_size, config.head_dim
    return 2 * h * (heads * d + 2 * kv_heads * d) + 2 * heads * d * h + 6 * h * channels


def held_keys(plan: PruningPlan, context: int) -> list[float]:
    """Per layer, the keys a decoding sequence of `context` tokens holds there: prompt rows that
    prefill dropping removed stay out of the layers after its cut, and a KV budget caps the rest."""
    cut, budget = dict(plan.length.prefill_keep), plan.length.kv_budget
    keys, held = float(context), []
    for i in range(len(plan.layers)):
        held.append(min(keys, budget) if budget else keys)
        if i in cut:
            keys = max(1.0, keys * cut[i])
    return held


def features(plan: PruningPlan, config: ModelConfig, phase: str, context: int, batch: int,
             layer_fraction: float = 1.0) -> list[float]:
    """FEATURES of one step of `plan`: a decode step of `batch` sequences holding `context` keys,
    or the prefill of one `context`-token prompt. `layer_fraction`: the share of the present
    layers an average decode token runs (early exits; 1.0 without)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    d = config.head_dim
    cut = dict(plan.length.prefill_keep)
    budget = plan.length.kv_budget
    layers = linear = attention = scored = 0.0
    # Decode: every sequence's row attends the keys it holds. Prefill: one prompt, causal, and the
    # rows dropping removes leave the batch (rows and keys are the same tokens).
    held = held_keys(plan, context) if phase == "decode" else None
    rows = float(batch) if phase == "decode" else float(context)
    for i, layer in enumerate(plan.layers):
        if layer.keep:
            heads = config.num_heads if layer.kept_q_heads is None else len(layer.kept_q_heads)
            kv_heads = len(plan.kv_heads_of(i, config))
            channels = config.intermediate_size if layer.kept_ffn_channels is None else len(layer.kept_ffn_channels)
            layers += 1
            linear += rows * _layer_linear(config, heads, kv_heads, channels)
            if phase == "decode":
                pairs = rows * held[i]
                scored += rows if budget else 0.0     # a budget scores every row's keys in every layer
            else:
                pairs = rows * (rows + 1) / 2            # each row attends its prefix, half the keys on average
            attention += 4 * d * heads * pairs
        if phase == "prefill" and i in cut:
            rows = max(1.0, rows * cut[i])
    # Early exits shorten decode rows only (prefill rows run every layer).
    scale = layer_fraction if phase == "decode" else 1.0
    return [layers, linear * scale / 1e9, attention * scale / 1e9, scored, 1.0]


def _nnls(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Non-negative least squares by elimination: refit without any feature whose weight comes out
    negative (a handful of features, so the active set settles in a few rounds)."""
    active = [j for j in range(x.shape[1]) if x[:, j].abs().max() > 0]    # a feature no probe moves: weight 0
    while True:
        sol = torch.linalg.lstsq(x[:, active], y[:, None], driver="gelsd").solution[:, 0]
        if (sol >= 0).all() or len(active) == 1:
            w = torch.zeros(x.shape[1], dtype=x.dtype)
            w[active] = sol.clamp_min(0)
            return w
        active.pop(int(sol.argmin()))


@dataclass
class CostModel:
    """Seconds per step = weights . features, per phase."""

    weights: dict[str, list[float]]
    context: int
    batch: int
    residuals: dict[str, float]       # relative RMS error of the fit on its probes, per phase

    @classmethod
    def fit(cls, samples: dict[str, list[tuple[list[float], float]]], context: int, batch: int) -> "CostModel":
        """samples: per phase, (features, measured seconds per step) of the timed probes."""
        weights, residuals = {}, {}
        for phase, rows in samples.items():
            if len(rows) < 2:
                raise ValueError(f"fitting the {phase} cost needs at least two timed plans, got {len(rows)}")
            x = torch.tensor([f for f, _ in rows], dtype=torch.float64)
            y = torch.tensor([t for _, t in rows], dtype=torch.float64)
            w = _nnls(x, y)
            weights[phase] = w.tolist()
            residuals[phase] = float(((x @ w - y) / y).pow(2).mean().sqrt())
        return cls(weights, context, batch, residuals)

    def seconds(self, plan: PruningPlan, config: ModelConfig, phase: str, layer_fraction: float = 1.0) -> float:
        f = features(plan, config, phase, self.context, self.batch, layer_fraction)
        return max(sum(w * x for w, x in zip(self.weights[phase], f)), 1e-9)

    def speedup(self, plan: PruningPlan, dense: PruningPlan, config: ModelConfig, phase: str,
                layer_fraction: float = 1.0) -> float:
        """Predicted dense step time over this plan's."""
        return self.seconds(dense, config, phase) / self.seconds(plan, config, phase, layer_fraction)
