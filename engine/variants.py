"""Several plans served by one engine: weight-sliced variants sharing one scheduler and one KV cache.

`trident serve --plans balanced,aggressive,long-context` loads each plan as a `Variant`: its own
sliced model (the embedding, final norm and LM head are the first variant's tensors, shared), its
own exits and FLOP counter, and a `ModelRunner` over the shared KV cache. The cache has, per
layer, as many KV heads as the widest variant that keeps the layer; a variant's layer reads and
writes the first of them (a view, no copy). Blocks come from one pool, so the KV budget is one
budget, and a request's `{"pruning": {"profile": name}}` picks its variant (the first one by
default). A sequence stays with its variant; prefix caching never shares a block between variants
(their K/V differ), since each variant salts the block hash chain.

Within a step, `GroupedRunner` runs the scheduled sequences of each variant as one group (one
forward pass through that variant's layers), after the step's KV compaction copies; dynamic
pruning (KV budgets, prefill dropping, exits) still mixes freely within a group.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trident.engine.model import LlamaModel
from trident.engine.model_runner import ModelRunner, RunnerOutput, copy_slots
from trident.engine.pruning.plan import ExitPoint, PruningPlan
from trident.engine.scheduler import SchedulerOutput


@dataclass
class Variant:
    name: str
    plan: PruningPlan | None                    # None: the unpruned model
    model: LlamaModel
    runner: ModelRunner | None = None
    exits: dict[int, ExitPoint] = field(default_factory=dict)
    cache_salt: int = 0                         # seeds the prefix-cache hash chain (0: the first variant)
    weight_bytes: int = 0                       # bytes of the tensors this variant does not share

    @property
    def kept_layers(self) -> list[bool]:
        return [layer.keep for layer in self.plan.layers] if self.plan is not None \
            else [True] * self.model.config.num_layers


def share_unsliced(first: LlamaModel, other: LlamaModel) -> None:
    """Point `other`'s embedding, final norm, LM head and RoPE tables at `first`'s tensors (plans
    never slice them), so a second variant costs only its layers."""
    other.embed_tokens.weight = first.embed_tokens.weight
    other.norm.weight = first.norm.weight
    other.lm_head.weight = first.lm_head.weight
    other.rotary = first.rotary


def unshared_bytes(model: LlamaModel, seen: set[int]) -> int:
    """Bytes of `model`'s tensors not in `seen` (data pointers), which it then adds."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def kv_heads_per_layer(variants: list[Variant], num_layers: int) -> list[int]:
    """KV heads the shared cache holds per layer: the most any variant keeps there (0: no variant
    keeps the layer)."""
    heads = [0] * num_layers
    for v in variants:
        for layer in v.model.layers:
            heads[layer.spec.index] = max(heads[layer.spec.index], layer.self_attn.num_kv_heads)
    return heads


def caches_for(model: LlamaModel, caches: list[tuple[torch.Tensor, torch.Tensor] | None]):
    """The views of the shared per-layer caches that `model`'s present layers use."""
    out = []
    for layer in model.layers:
        k, v = caches[layer.spec.index]
        h = layer.self_attn.num_kv_heads
        out.append((k[:, :h], v[:, :h]) if h < k.shape[1] else (k, v))
    return out


class GroupedRunner:
    """One step over several variants: each variant's sequences run as one group."""

    def __init__(self, variants: list[Variant], caches: list[tuple[torch.Tensor, torch.Tensor]],
                 device: torch.device) -> None:
        self.variants = {v.name: v for v in variants}
        self.default = variants[0]
        self.caches = caches
        self.device = device

    @property
    def sampler(self):
        return self.default.runner.sampler

    @sampler.setter
    def sampler(self, fn) -> None:
        for v in self.variants.values():
            v.runner.sampler = fn

    def copy_kv(self, copies: list[tuple[list[int], list[int]]]) -> None:
        """Compaction moves slots in every layer of the shared cache, whatever the variant."""
        copy_slots(self.caches, copies, self.device)

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self.copy_kv(sched.kv_copies)
        groups: dict[str, list] = {}
        for s in sched.scheduled:
            groups.setdefault(s.seq.variant or self.default.name, []).append(s)
        merged = RunnerOutput()
        for name, scheduled in groups.items():
            out = self.variants[name].runner.execute(SchedulerOutput(scheduled=scheduled))
            merged.merge(out)
        return merged
