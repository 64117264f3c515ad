"""Lossless self-speculative decoding: the served model, run without some of its layers, drafts
tokens; the full model verifies them in one pass.

Per decode step of a sequence that speculates (`Sequence.num_draft_tokens` > 0):
1. Draft: k single-token passes through the draft layers (a subset of the served layers, sharing
   their weights), each followed by the final norm and the LM head. A draft token's K/V is written
   to the slot its verification will use, in the draft layers only.
2. Verify: the current token and the k drafts run through every layer as one (k+1)-row chunk,
   overwriting every layer's K/V at those slots, and give the model's distribution at each of the
   k+1 positions.
3. Accept: greedy keeps the drafts up to the first that differs from the model's argmax, then the
   model's own token there (or after the last draft): 1 to k+1 tokens, exactly what dense greedy
   decoding emits. Sampling uses speculative sampling (Leviathan et al. 2023, Chen et al. 2023):
   draft token x drawn from q is kept with probability min(1, p(x) / q(x)); the first rejected one
   is replaced by a draw from norm(max(p - q, 0)); if all are kept, one more comes from p. The
   output then follows p, the model's distribution after temperature, top-k, top-p and min-p.
4. Roll back: the slots of rejected drafts go back to the sequence's reserve, and blocks left
   holding none of its tokens go back to the block manager (`BlockManager.rollback`).

Seeds: drafts and acceptance draw from the request's generator, and how many tokens a step
drafts depends on the room the step has, so a seeded speculating request follows the model's
distribution but its exact tokens can differ from a plain run's and between batches.

What the draft skips is a depth plan's dropped layers (`trident calibrate` ranks them by Block
Influence and writes `depth-N` plans) or an explicit list. The draft shares the served weights, so
a plan's compensation is not part of it; verification makes any draft lossless, a better one only
accepts more.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trident.engine.config import ModelConfig
from trident.engine.sampler import draw


def draft_skip_layers(draft: str, config: ModelConfig, model_name: str) -> list[int]:
    """The original layer indices the draft skips: from a comma-separated list, or the layers a
    depth plan (a profile name such as `depth-4` from `trident calibrate`, or a JSON file) drops."""
    from trident.engine.pruning.plan import PruningPlan
    from trident.engine.pruning.profiles import profile_dir

    text = draft.strip()
    if text and all(part.strip().isdigit() for part in text.split(",")):
        skip = sorted({int(part) for part in text.split(",")})
    else:
        path = Path(text) if Path(text).is_file() else profile_dir(model_name) / f"{text}.json"
        if not path.is_file():
            raise ValueError(f"speculative draft {draft!r} is neither comma-separated layer indices nor a depth "
                             f"plan (a file, or a profile such as depth-4 that `trident calibrate --model "
                             f"{model_name}` writes to {path.parent})")
        plan = PruningPlan.load(path)
        if len(plan.layers) != config.num_layers:
            raise ValueError(f"draft plan {path} has {len(plan.layers)} layers, the model {config.num_layers}")
        skip = [i for i, layer in enumerate(plan.layers) if not layer.keep]
    if any(not 0 <= i < config.num_layers for i in skip):
        raise ValueError(f"speculative draft layers must be in [0, {config.num_layers}), got {skip}")
    if not skip:
        raise ValueError("the speculative draft skips no layer: it would cost as much as the model it drafts for")
    if len(skip) >= config.num_layers:
        raise ValueError("the speculative draft skips every layer")
    return skip


def speculation_blocker(seq_params) -> str | None:
    """Why a request's sampling settings rule out speculation, or None. Penalties and min_tokens
    make each position's distribution depend on the drafts before it; this engine does not track that."""
    p = seq_params
    if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
        return "presence, frequency and repetition penalties"
    if p.min_tokens:
        return "min_tokens"
    return None


@dataclass
class Draft:
    tokens: list[int]                          # k draft tokens
    probs: list[torch.Tensor] | None           # [V] draft distribution of each (None when greedy)


def accept_greedy(draft: list[int], target_logits: torch.Tensor) -> list[int]:
    """Tokens greedy decoding emits: drafts up to the first miss, then the model's token.
    target_logits: [k + 1, V]."""
    target = target_logits.argmax(-1).tolist()
    out = []
    for d, t in zip(draft, target):
        if d != t:
            break
        out.append(d)
    out.append(target[len(out)])
    return out


def accept_sampled(draft: Draft, target_probs: torch.Tensor, generator: torch.Generator | None) -> list[int]:
    """Speculative sampling: emitted tokens follow target_probs ([k + 1, V]) exactly."""
    out = []
    for i, (x, q) in enumerate(zip(draft.tokens, draft.probs)):
        p = target_probs[i]
        u = float(torch.rand((), generator=generator))
        if u * float(q[x]) < float(p[x]):             # u < p(x) / q(x), without dividing by q(x)
            out.append(x)
            continue
        residual = (p - q).clamp_(min=0)
        total = float(residual.sum())
        out.append(draw(residual / total if total > 0 else p, generator))
        return out
    out.append(draw(target_probs[len(draft.tokens)], generator))
    return out
