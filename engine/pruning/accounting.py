"""Honest FLOP accounting per step and per request, split by pruning axis.

Counts matrix FLOPs (2 per multiply-add) of what ran and of what the dense model would have run
for the same tokens:
- per token and layer: q/k/v/o projections 2*H*(q + 2*kv) + 2*q*H, FFN 3 * 2*H*F;
- attention: 4 * q_heads * head_dim * context per token (scores and weighted sum); a CPU decode
  step runs every sequence over the batch's longest context (the rest masked), so there each
  token counts that many keys, on the executed and the dense side alike;
- LM head: 2*H*V per row whose logits were computed (the same pruned or dense).
Savings go to the axis that made them: dropped layers to depth, fewer heads/channels to width,
fewer attended tokens to length; the cost of pruning decisions (exit classifiers, importance
scores) is added to the executed side, so a saved fraction is never flattering.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from trident.engine.config import ModelConfig

AXES = ("depth", "width", "length")


@dataclass
class FlopCount:
    executed: float = 0.0
    dense: float = 0.0
    saved: dict[str, float] = field(default_factory=lambda: dict.fromkeys(AXES, 0.0))
    # Length-axis counts next to the FLOPs they saved.
    prompt_tokens_dropped: int = 0      # prompt rows prefill pruning kept out of deeper layers
    kv_slots_evicted: int = 0           # keys a KV budget evicted
    kv_bytes_saved: float = 0.0         # K/V bytes those tokens do not occupy (dropped: in deeper layers)
    # Speculative decoding (depth axis): drafts proposed and verified, verify passes, draft FLOPs.
    draft_tokens: int = 0
    accepted_tokens: int = 0
    verify_steps: int = 0
    draft_flops: float = 0.0
    # Early exit (depth axis): tokens that left after n layers ({n: tokens}), classifications run,
    # and the FLOPs of those classifications and of the K/V filled for the layers exited tokens skipped.
    exit_layer_tokens: dict[int, int] = field(default_factory=dict)
    exit_checks: int = 0
    exit_flops: float = 0.0
    # Depth per token: tokens processed and the layers they ran through (drafts and verify rows included).
    tokens: int = 0
    layer_tokens: int = 0

    def add(self, other: "FlopCount") -> None:
        self.executed += other.executed
        self.dense += other.dense
        for axis in AXES:
            self.saved[axis] += other.saved[axis]
        self.prompt_tokens_dropped += other.prompt_tokens_dropped
        self.kv_slots_evicted += other.kv_slots_evicted
        self.kv_bytes_saved += other.kv_bytes_saved
        self.draft_tokens += other.draft_tokens
        self.accepted_tokens += other.accepted_tokens
        self.verify_steps += other.verify_steps
        self.draft_flops += other.draft_flops
        for layers, count in other.exit_layer_tokens.items():
            self.exit_layer_tokens[layers] = self.exit_layer_tokens.get(layers, 0) + count
        self.exit_checks += other.exit_checks
        self.exit_flops += other.exit_flops
        self.tokens += other.tokens
        self.layer_tokens += other.layer_tokens

    def summary(self) -> dict:
        """The `usage.pruning` object: executed vs dense FLOPs and the saved fraction per axis."""
        dense = self.dense or 1.0
        return {
            "executed_flops": self.executed,
            "dense_flops": self.dense,
            "saved_flops": dict(self.saved),
            "saved_fraction": {axis: self.saved[axis] / dense for axis in AXES},
            "total_saved_fraction": 1.0 - self.executed / dense,
            "layers_per_token": self.layer_tokens / max(self.tokens, 1),
            "tokens": self.tokens, "layer_tokens": self.layer_tokens,
            "length": {"prompt_tokens_dropped": self.prompt_tokens_dropped,
                       "kv_slots_evicted": self.kv_slots_evicted, "kv_bytes_saved": self.kv_bytes_saved},
            "speculative": {"draft_tokens": self.draft_tokens, "accepted_tokens": self.accepted_tokens,
                            "verify_steps": self.verify_steps, "draft_flops": self.draft_flops,
                            "acceptance_rate": self.accepted_tokens / max(self.draft_tokens, 1)},
            "early_exit": {"tokens_exited": sum(self.exit_layer_tokens.values()),
                           "exits_after_layers": {str(n): c for n, c in sorted(self.exit_layer_tokens.items())},
                           "checks": self.exit_checks, "classifier_and_fill_flops": self.exit_flops},
        }

    @classmethod
    def from_summary(cls, summary: dict) -> "FlopCount":
        length, spec = summary.get("length", {}), summary.get("speculative", {})
        return cls(summary["executed_flops"], summary["dense_flops"], dict(summary["saved_flops"]),
                   length.get("prompt_tokens_dropped", 0), length.get("kv_slots_evicted", 0),
                   length.get("kv_bytes_saved", 0.0), spec.get("draft_tokens", 0), spec.get("accepted_tokens", 0),
                   spec.get("verify_steps", 0), spec.get("draft_flops", 0.0),
                   {int(n): c for n, c in summary.get("early_exit", {}).get("exits_after_layers", {}).items()},
                   summary.get("early_exit", {}).get("checks", 0),
                   summary.get("early_exit", {}).get("classifier_and_fill_flops", 0.0),
                   summary.get("tokens", 0), summary.get("layer_tokens", 0))


def merge_summaries(summaries: list[dict]) -> dict:
    """One `usage.pruning` for several engine requests (a multi-prompt completion): FLOPs summed,
    fractions recomputed from the sums."""
    summaries = [s for s in summaries if s]
    if not summaries:
        return {}
    total = FlopCount()
    for s in summaries:
        total.add(FlopCount.from_summary(s))
    return total.summary()


@dataclass(frozen=True)
class LayerShape:
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    decode_attention_heads: int | None = None   # heads a decode step computes, if not num_heads


class FlopCounter:
    """Per-sequence step FLOPs for a model whose present layers have `shapes` (None = dropped)."""

    def __init__(self, config: ModelConfig, shapes: list[LayerShape | None], decode_pads: bool = False) -> None:
        self.config = config
        self.decode_pads = decode_pads          # decode attention runs over the batch's padded keys
        h, d = config.hidden_size, config.head_dim
        dense_shape = LayerShape(config.num_heads, config.num_kv_heads, config.intermediate_size)
        self.dense_linear = self._linear(dense_shape) * config.num_layers
        self.dense_attn_coef = 4 * config.num_heads * d * config.num_layers
        present = [s for s in shapes if s is not None]
        self.linear = sum(self._linear(s) for s in present)
        self.attn_coef = 4 * d * sum(s.num_heads for s in present)
        self.decode_attn_coef = 4 * d * sum(s.decode_attention_heads or s.num_heads for s in present)
        # What the dropped layers would have cost, per token and per unit of context.
        dropped = config.num_layers - len(present)
        self.depth_linear = self._linear(dense_shape) * dropped
        self.depth_attn_coef = 4 * config.num_heads * d * dropped
        self.lm_head = 2 * h * config.vocab_size
        # Per original layer index (0 for a dropped layer), for steps whose rows or keys change
        # between layers (the length axis).
        self.layer_linear = [self._linear(s) if s else 0 for s in shapes]
        self.layer_heads = [s.num_heads if s else 0 for s in shapes]
        self.layer_decode_heads = [(s.decode_attention_heads or s.num_heads) if s else 0 for s in shapes]
        self.layer_kv_heads = [s.num_kv_heads if s else 0 for s in shapes]

    def _linear(self, s: LayerShape) -> int:
        h, d = self.config.hidden_size, self.config.head_dim
        q, kv = s.num_heads * d, s.num_kv_heads * d
        return 2 * h * (q + 2 * kv) + 2 * q * h + 6 * h * s.intermediate_size

    def step(self, num_new_tokens: int, context_end: int, num_logit_rows: int,
             attended: float | None = None, decode: bool = False, batch_keys: int | None = None) -> FlopCount:
        """FLOPs of one sequence's step: `num_new_tokens` ending at position `context_end` - 1.

        attended: key positions the new tokens actually attended in total (after length pruning);
        None = all of them (dense length). decode: the step ran the decode attention path, whose
        every sequence attends `batch_keys` keys (the longest in the batch) when it pads.
        """
        start = context_end - num_new_tokens
        context_sum = num_new_tokens * (start + context_end + 1) / 2      # sum of (position + 1)
        if decode and self.decode_pads and batch_keys is not None:
            context_sum = num_new_tokens * max(batch_keys, context_end)
        attended = context_sum if attended is None else attended
        head = num_logit_rows * self.lm_head
        dense = num_new_tokens * self.dense_linear + self.dense_attn_coef * context_sum + head
        attn_coef = self.decode_attn_coef if decode else self.attn_coef
        executed = num_new_tokens * self.linear + attn_coef * attended + head
        depth = num_new_tokens * self.depth_linear + self.depth_attn_coef * context_sum
        length = attn_coef * (context_sum - attended)
        width = dense - executed - depth - length
        return FlopCount(executed, dense, {"depth": depth, "width": width, "length": length})

    def speculative(self, num_drafts: int, accepted: int, context: int, draft_layers: list[int]) -> FlopCount:
        """One speculative decode of a sequence with `context` tokens before its current one:
        `num_drafts` single-token passes through `draft_layers` (original indices) with the LM
        head, one (num_drafts + 1)-row verify pass, 1 + `accepted` tokens emitted. Against this
        model decoding those tokens one by one, the difference (more FLOPs, fewer weight passes)
        goes to the depth axis, where the draft comes from."""
        d = self.config.head_dim
        linear = sum(self.layer_linear[i] for i in draft_layers)
        heads = sum(self.layer_decode_heads[i] for i in draft_layers)
        draft = sum(linear + 4 * d * heads * (context + j + 1) + self.lm_head for j in range(num_drafts))
        verify = self.step(num_drafts + 1, context + num_drafts + 1, num_drafts + 1)
        plain = self.step(accepted + 1, context + accepted + 1, accepted + 1)
        executed = draft + verify.executed
        saved = dict(plain.saved)
        saved["depth"] += plain.executed - executed
        return FlopCount(executed, plain.dense, saved, draft_tokens=num_drafts, accepted_tokens=accepted,
                         verify_steps=1, draft_flops=draft)

    def step_segments(self, segments: list[tuple[int, int, int, float, float, int]], num_new_tokens: int,
                      context_end: int, num_logit_rows: int, decode: bool = False,
                      batch_keys: int | None = None, exit_layer: int | None = None, exit_checks: int = 0) -> FlopCount:
        """FLOPs of one length-pruned sequence's step, whose rows and keys changed between layers.

        segments: per stretch of layers, (first layer, last layer, rows, attended keys summed over
        those rows, scored (query, key) pairs per scored layer, scored layers). Scoring (the key
        mass for prefill dropping and KV budgets) counts as executed, against the length axis.
        """
        d = self.config.head_dim
        heads = self.layer_decode_heads if decode else self.layer_heads
        executed = num_logit_rows * self.lm_head
        for first, last, rows, attended, scored_pairs, scored_layers in segments:
            layers = range(first, last + 1)
            executed += rows * sum(self.layer_linear[i] for i in layers)
            executed += 4 * d * attended * sum(heads[i] for i in layers)
            executed += 2 * d * scored_pairs * scored_layers * max(heads[i] for i in layers) if scored_layers else 0
        full = self.step(num_new_tokens, context_end, num_logit_rows, decode=decode, batch_keys=batch_keys)
        # Early exit: a classification is a norm and a probe (6 FLOPs per hidden unit); an exited
        # decode row fills K and V in every deeper present layer, and skips the rest of them.
        h = self.config.hidden_size
        exit_cost, skipped = exit_checks * 6 * h, 0.0
        if exit_layer is not None:
            keys = max(batch_keys or 0, context_end) if decode and self.decode_pads else context_end
            deeper = range(exit_layer + 1, len(self.layer_linear))
            exit_cost += sum(2 * h * 2 * self.layer_kv_heads[i] * d for i in deeper)
            skipped = sum(self.layer_linear[i] + 4 * d * keys * heads[i] for i in deeper)
        saved = dict(full.saved)
        saved["length"] = full.executed - executed - skipped      # this model without dynamic pruning, less what ran
        saved["depth"] += skipped - exit_cost
        count = FlopCount(executed + exit_cost, full.dense, saved, exit_checks=exit_checks, exit_flops=exit_cost)
        if exit_layer is not None:
            count.exit_layer_tokens = {exit_layer + 1: 1}
        return count
